"""Peak memory: the chunk stage against its shard's size; the embed stage against its shard's length.

Each measurement runs in a fresh process: peak RSS (VmHWM) minus the RSS after imports and warm-up.

The embed stage's peak depends on how its three threads (tokenize, model, write) happen to overlap, so each
length is measured `--repeats` times, alternating, and the median counts.

    python -m benchmarks.memory [--chunk-mb 100] [--embed-chunks 10000,100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import merge_results

GOAL_CHUNK_RSS_OVER_SHARD = 3.0
GOAL_EMBED_GROWTH = 1.25  # the larger shard's peak may exceed the smaller's by at most this factor


def _rss_mb() -> float:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space.

    Not `ru_maxrss`: Linux carries the pre-exec image's high-water mark into it, and a spawned child's
    pre-exec image is a fork of the parent, so ru_maxrss would report the parent's RSS when that is larger.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _chunk_child(work: str, queue) -> None:
    from fineweb_modal.config import build_run_config
    from fineweb_modal.models import load_tokenizer, model_info
    from fineweb_modal.shards import ShardJob, run_shard

    run = build_run_config(name="mem", data_dir=work, stages="chunk")
    load_tokenizer(model_info(run.chunk.model).path).encode("warm up")
    baseline = _current_rss_mb()
    run_shard(ShardJob(stage="chunk", shard="big", run=run))
    queue.put({"baseline_mb": baseline, "peak_mb": _rss_mb()})


def _embed_child(work: str, n_chunks: int, queue) -> None:
    from fineweb_modal.config import EmbedConfig
    from fineweb_modal.embedding import embed_shard, get_engine
    from fineweb_modal.models import DEFAULT_MODEL

    cfg = EmbedConfig(model=DEFAULT_MODEL)
    get_engine(cfg).embed(["warm up the engine"] * 64)
    baseline = _current_rss_mb()
    embed_shard(Path(work) / f"chunks-{n_chunks}.parquet", Path(work) / f"emb-{n_chunks}.parquet", cfg, Path(work) / f"parts-{n_chunks}")
    queue.put({"chunks": n_chunks, "baseline_mb": baseline, "peak_mb": _rss_mb()})


def _write_inputs(work: str, chunk_mb: int, embed_sizes: list[int]) -> float:
    """The inputs, written here so their making does not count in the children's peaks; returns the shard's MB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.corpus import web_like_documents, write_shard
    from fineweb_modal.config import build_run_config
    from fineweb_modal.shards import layout_for

    layout = layout_for(build_run_config(name="mem", data_dir=work, stages="chunk"))
    path = write_shard(web_like_documents(int(chunk_mb * 1e6 / 4.6)), layout.output_path("download", "big"))
    for n in embed_sizes:
        table = pa.table({"id": [str(i) for i in range(n)], "doc_index": pa.array(range(n), pa.int64()),
                          "chunk_index": pa.array([0] * n, pa.int32()), "chunk_text": [f"chunk {i} of a short shard" for i in range(n)]})  # fmt: skip
        pq.write_table(table, Path(work) / f"chunks-{n}.parquet")
    return path.stat().st_size / 1e6


def _in_child(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    """Measure both, merge the entries into benchmarks/results/latest.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-mb", type=int, default=100)
    parser.add_argument("--embed-chunks", default="10000,100000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="fineweb-mem-")
    try:
        sizes = [int(n) for n in args.embed_chunks.split(",")]
        shard_mb = _write_inputs(work, args.chunk_mb, sizes)
        chunk = _in_child(_chunk_child, work)
        growth = chunk["peak_mb"] - chunk["baseline_mb"]
        ratio = growth / shard_mb
        runs: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(args.repeats):
            for n in sizes:
                measured = _in_child(_embed_child, work, n)
                runs[n].append(measured["peak_mb"] - measured["baseline_mb"])
        growths = [statistics.median(runs[n]) for n in sizes]
        embed_ratio = growths[-1] / max(growths[0], 1.0)
        entries = {
            "memory-chunk": {
                "shard_mb": round(shard_mb, 1),
                "rss_growth_mb": round(growth, 1),
                "growth_over_shard": round(ratio, 2),
                "verdict": f"{'PASS' if ratio <= GOAL_CHUNK_RSS_OVER_SHARD else 'FAIL'} RSS growth ≤ {GOAL_CHUNK_RSS_OVER_SHARD}× the shard",
            },
            "memory-embed": {
                "chunks": sizes,
                "rss_growth_mb": [round(g, 1) for g in growths],
                "rss_growth_mb_runs": {str(n): [round(g, 1) for g in runs[n]] for n in sizes},
                "largest_over_smallest": round(embed_ratio, 2),
                "verdict": f"{'PASS' if embed_ratio <= GOAL_EMBED_GROWTH else 'FAIL'} peak flat in shard length (≤ {GOAL_EMBED_GROWTH}×)",
            },
        }
        print(json.dumps(entries, indent=2))
        print(f"merged into {merge_results('memory', entries)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
