"""The summarize stage's pictures: the chunk token-length histogram and per-shard throughput, as PNG files."""

from __future__ import annotations

import base64
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on containers or CI
    import matplotlib.pyplot as plt

    return plt


def histogram_png(edges: list[int], counts: list[int], path: Path, title: str) -> Path:
    """Bars of chunk counts per token-length bin."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.2), dpi=100)
    labels = [f"{low}–{high - 1}" for low, high in zip(edges, edges[1:])]
    axes.bar(range(len(counts)), counts, color="#2f6fdf")
    axes.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
    axes.set_xlabel("tokens per chunk ([CLS]/[SEP] included)")
    axes.set_ylabel("chunks")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def throughput_png(rates: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Tokens per second per shard, one bar group per stage (`rates[stage][shard]`)."""
    plt = _pyplot()
    shards = sorted({shard for by_shard in rates.values() for shard in by_shard})
    figure, axes = plt.subplots(figsize=(7, 3.2), dpi=100)
    width = 0.8 / max(len(rates), 1)
    for offset, (stage, by_shard) in enumerate(sorted(rates.items())):
        xs = [i + offset * width for i in range(len(shards))]
        axes.bar(xs, [by_shard.get(s, 0) for s in shards], width=width, label=stage)
    axes.set_xticks([i + width * (len(rates) - 1) / 2 for i in range(len(shards))], [s[-14:] for s in shards], rotation=45, ha="right", fontsize=8)
    axes.set_yscale("log")
    axes.set_ylabel("tokens/s")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def data_uri(path: Path) -> str:
    """A PNG inlined as a data: URI (for a markdown artifact)."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
