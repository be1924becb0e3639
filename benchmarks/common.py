"""Timing helpers shared by the benchmarks: alternate the variants, take medians, report ratios."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def alternate(variants: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Median seconds per variant, run in turn so drift on a shared machine hits all alike."""
    if warmup:
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def verdict(value: float, goal: float) -> str:
    """PASS/FAIL of a ratio against its goal."""
    return "PASS" if value >= goal else "FAIL"


def merge_results(name: str, entries: dict) -> Path:
    """Add entries to benchmarks/results/latest.json (other benchmarks' entries are kept)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "latest.json"
    current = json.loads(path.read_text()) if path.is_file() else {"entries": {}}
    current["entries"].update(entries)
    current["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(current, indent=2))
    return path
