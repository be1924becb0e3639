"""Before spending: sample every shard (or, before a Hub dataset's download, its first documents), chunk the
sample, forecast chunks, tokens, GPU-seconds and dollars.

Throughput comes from `benchmarks/results/latest.json` when it holds a GPU measurement for that GPU,
else from the documented defaults below (tokens/s for a BERT-base-sized model such as
nomic-embed-text-v1.5, embedding tokens incl. [CLS]/[SEP] and the prefix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fineweb_modal import download
from fineweb_modal.chunking import check_columns, chunk_texts
from fineweb_modal.config import ChunkConfig
from fineweb_modal.costs import Resources, cost_usd, parse_gpu, stage_resources
from fineweb_modal.errors import BadDataError, ConfigError
from fineweb_modal.models import model_info, prefix_token_count
from fineweb_modal.storage import sample_arrow_rows

SAMPLE_DOCS = 200
HUB_SAMPLE_DOCS = 1000  # streamed from the start of a Hub dataset: its first file's first documents
# Estimates for nomic-embed-text-v1.5's shape: the engine measured 1.68 M tokens/s end to end on an H200
# (benchmarks/results/embed-gpu.json). The H100 has the same matmul rate and 0.7x the memory bandwidth; the
# memory-bound kernels took a quarter of the H200's time (benchmarks/results/model-profile-gpu.json), so
# ~0.9x. The seed's TEI on A10G did 24-65 k tokens/s; other GPUs scaled by their bf16 throughput.
DEFAULT_TOKENS_PER_S = {
    "transformers": {"H100": 1.5e6, "H200": 1.68e6, "A100-80GB": 0.8e6, "L40S": 0.5e6, "A10G": 0.2e6, "L4": 0.15e6},
    "tei": {"H100": 1.2e6, "H200": 1.4e6, "A100-80GB": 0.6e6, "L40S": 0.35e6, "A10G": 0.065e6, "L4": 0.05e6},
}
BENCHMARK_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "latest.json"


@dataclass
class ShardSample:
    """What a sample of one shard says about the whole shard."""

    shard: str
    rows: int
    sampled: int
    est_chunks: float
    est_source_tokens: float
    est_embed_tokens: float


def sample_shard(path: Path, shard: str, cfg: ChunkConfig, prefix: str = "", sample_docs: int = SAMPLE_DOCS) -> ShardSample:
    """Chunk evenly spaced documents of one arrow shard and scale the counts up to all its rows."""
    _, sample, rows = sample_arrow_rows(path, sample_docs)
    return _scaled_up(shard, sample.column(cfg.text_column).to_pylist(), rows, cfg, prefix)


def _scaled_up(shard: str, texts: list[str | None], rows: int, cfg: ChunkConfig, prefix: str) -> ShardSample:
    """Chunk a sample's texts and scale the counts up to `rows` documents."""
    chunk_rows, stats = chunk_texts(texts, cfg)
    prefix_tokens = prefix_token_count(model_info(cfg.model).path, prefix)
    scale = rows / len(texts) if texts else 0.0
    embed_tokens = sum(r[4] + prefix_tokens for r in chunk_rows)
    return ShardSample(shard, rows, len(texts), len(chunk_rows) * scale, stats.source_tokens * scale, embed_tokens * scale)


def _require_readable_hub(repo_id: str) -> None:
    """ConfigError when the Hub dataset cannot be read from here for good (offline mode, not there, gated, no network);
    a ConnectionError, which the task retries, when the Hub failed just now (429, 5xx)."""
    if download.hub_offline():
        raise ConfigError("planning a Hub dataset before its download reads the Hub, and HF_HUB_OFFLINE is set: unset it, or download first and plan the downloaded shards")
    if problem := download.hub_access_problem(repo_id):
        raise ConfigError(problem.message) if problem.settled else ConnectionError(problem.message)


def hub_rows(repo_id: str, subset: str | None, split: str) -> tuple[int, bool]:
    """The documents of a Hub dataset's split without downloading it, and whether its files are all parquet: their
    footers' row counts (exact; read 16 at a time), else the split size its card records."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec
    import pyarrow.parquet as pq
    from datasets import load_dataset_builder

    with download.hub_config_errors(repo_id, subset):
        builder = load_dataset_builder(download.hub_load_path(repo_id), subset)
    files, recorded = dict(builder.config.data_files or {}), builder.info.splits or {}
    if split not in files and split not in recorded:
        raise ConfigError(f"{download.hub_name(repo_id, subset)} has no split {split!r}: it has {', '.join(map(str, files or recorded)) or 'none'}")
    urls = [str(url) for url in files.get(split, [])]
    if urls and all(url.endswith(".parquet") for url in urls):

        def footer_rows(url: str) -> int:
            with fsspec.open(url, "rb") as file:
                return pq.read_metadata(file).num_rows

        with ThreadPoolExecutor(max_workers=16) as pool:
            return sum(pool.map(footer_rows, urls)), True
    if split in recorded and recorded[split].num_examples:
        return recorded[split].num_examples, False
    raise ConfigError(f"{repo_id}: its card records no split sizes and its files are not all parquet, so its rows cannot be counted without a download: run the download stage, then plan")


def sample_hub(repo_id: str, subset: str | None, split: str, cfg: ChunkConfig, prefix: str = "", sample_docs: int = HUB_SAMPLE_DOCS) -> ShardSample:
    """Chunk the first `sample_docs` documents a Hub dataset's split streams and scale up to all its rows; nothing is
    downloaded whole (from parquet, the text column's first row group only)."""
    from datasets import load_dataset

    _require_readable_hub(repo_id)
    rows, parquet = hub_rows(repo_id, subset, split)
    if (schema := download.hub_schema(repo_id, subset, split)) is not None:
        try:
            check_columns(schema, cfg, download.hub_name(repo_id, subset))
        except BadDataError as exc:
            raise ConfigError(f"{exc} (set --text-column)") from None
    with download.hub_config_errors(repo_id, subset):
        stream = load_dataset(download.hub_load_path(repo_id), subset, split=split, streaming=True, **({"columns": [cfg.text_column]} if parquet else {}))
        sample = list(stream.take(sample_docs))
    if sample and cfg.text_column not in sample[0]:
        raise ConfigError(f"{repo_id}: no column {cfg.text_column!r}; it has {list(sample[0])} (set --text-column)")
    return _scaled_up(f"{repo_id} (first {len(sample)} docs)", [row[cfg.text_column] for row in sample], rows, cfg, prefix)


def measured_tokens_per_s(results_path: Path | None = None) -> dict[str, float]:
    """GPU name → the engine's measured tokens/s, from the latest benchmark result (empty when none ran on a GPU)."""
    results_path = results_path or BENCHMARK_RESULTS
    if not results_path.is_file():
        return {}
    entry = json.loads(results_path.read_text()).get("entries", {}).get("embed-gpu", {})
    if not entry.get("tokens_per_s"):
        return {}
    device = entry["device"]
    gpu = next((g for g in DEFAULT_TOKENS_PER_S["transformers"] if g.split("-")[0] in device), None)
    return {gpu: float(entry["tokens_per_s"][entry.get("best_engine", "engine")])} if gpu else {}


def gpu_tokens_per_s(engine: str, gpu: str, measured: dict[str, float] | None = None) -> float:
    """The embed throughput to expect on a Modal GPU string (`H100`, `A10G:2`): the benchmark's where it ran there, else the default."""
    name, count = parse_gpu(gpu)
    measured = measured_tokens_per_s() if measured is None else measured
    rates = DEFAULT_TOKENS_PER_S[engine]
    per_gpu = measured.get(name) if engine == "transformers" and name in measured else rates.get(name, rates["H100"])
    return per_gpu * count


def forecast(samples: list[ShardSample], gpus: tuple[str, ...] = ("H100", "A10G", "L4")) -> list[dict]:
    """Per engine and GPU (`gpus`, and any other GPU the benchmark ran on): chunks, tokens, GPU hours and dollars
    for all sampled shards, and where the rate came from."""
    chunks = sum(s.est_chunks for s in samples)
    tokens = sum(s.est_embed_tokens for s in samples)
    measured = measured_tokens_per_s()
    embed = stage_resources("embed")
    rows = []
    for engine, rates in DEFAULT_TOKENS_PER_S.items():
        for gpu in (*gpus, *(g for g in measured if g not in gpus)):
            rate = gpu_tokens_per_s(engine, gpu, measured)
            seconds = tokens / rate
            rows.append(
                {
                    "engine": engine,
                    "gpu": gpu,
                    "chunks": round(chunks),
                    "embed tokens": round(tokens),
                    "tokens/s": round(rate),
                    "rate from": "benchmark" if engine == "transformers" and gpu in measured else "default estimate",
                    "GPU hours": _three_digits(seconds / 3600),  # a demo's hours are 0.0003, a corpus's 2.4
                    "cost $": _three_digits(cost_usd(seconds, Resources(cpu=embed.cpu, memory_gib=embed.memory_gib, gpu=gpu))),
                }
            )
    return rows


def _three_digits(value: float) -> float:
    """Rounded to 2 decimals, or to 3 significant digits below 1 (so small forecasts do not read 0.0)."""
    return round(value, 2) if value >= 1 or value == 0 else float(f"{value:.3g}")
