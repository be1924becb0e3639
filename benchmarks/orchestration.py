"""Prefect's cost per shard: the chunk flow over many tiny shards vs calling the shard function in a loop.

    python -m benchmarks.orchestration [--shards 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import merge_results
from benchmarks.corpus import web_like_documents, write_shard
from fineweb_modal.config import build_run_config
from fineweb_modal.shards import ShardJob, layout_for, run_shard

GOAL_SECONDS_PER_SHARD = 0.25


def main() -> None:
    """Time both ways on the same shards; merge the entry into benchmarks/results/latest.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    work = Path(tempfile.mkdtemp(prefix="fineweb-orch-"))
    try:
        run = build_run_config(name="orch", data_dir=str(work), stages="chunk", keep_columns=[])
        layout = layout_for(run)
        docs = web_like_documents(args.shards * 300, seed=3, median_tokens=60, sigma=0.5)
        per_shard = max(1, len(docs) // args.shards)
        shards = [f"t{i:03d}" for i in range(args.shards)]
        for i, shard in enumerate(shards):
            write_shard(docs[i * per_shard : (i + 1) * per_shard] or docs[:1], layout.output_path("download", shard))

        def forget() -> None:
            shutil.rmtree(layout.dataset_dir("chunk"), ignore_errors=True)

        run_shard(ShardJob(stage="chunk", shard=shards[0], run=run))  # tokenizer loaded, caches warm
        forget()
        start = time.perf_counter()
        for shard in shards:
            run_shard(ShardJob(stage="chunk", shard=shard, run=run))
        loop_seconds = time.perf_counter() - start
        forget()

        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            from flows.chunk import chunk

            chunk(name="orch", data_dir=str(work), keep_columns=[], shards=shards[:4], return_state=True)  # workers up
            forget()
            start = time.perf_counter()
            state = chunk(name="orch", data_dir=str(work), keep_columns=[], return_state=True)
            flow_seconds = time.perf_counter() - start
        assert state.is_completed(), state.message
        overhead = (flow_seconds - loop_seconds) / len(shards)
        entry = {
            "orchestration": {
                "shards": len(shards),
                "loop_seconds": round(loop_seconds, 2),
                "flow_seconds": round(flow_seconds, 2),
                "flow_seconds_per_shard": round(flow_seconds / len(shards), 3),
                "overhead_seconds_per_shard": round(overhead, 3),
                "verdict": f"{'PASS' if overhead <= GOAL_SECONDS_PER_SHARD else 'FAIL'} overhead ≤ {GOAL_SECONDS_PER_SHARD} s per shard",
            }
        }
        print(json.dumps(entry, indent=2))
        print(f"merged into {merge_results('orchestration', entry)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
