"""`prefect flow-run retry <id>` on a failed pipeline run re-runs only the failed shards (the ledger skips the rest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client

from tests.flows.helpers import child_flow_run_ids, task_runs_of

ROOT = Path(__file__).parents[2]


def test_prefect_flow_run_retry_reruns_only_the_failed_shard(prefect_api, demo_source, tmp_path):
    from flows.pipeline import pipeline

    broken = demo_source / "data-00001-of-00003.parquet"
    backup = tmp_path / "backup.parquet"
    shutil.copy(broken, backup)
    broken.write_bytes(broken.read_bytes()[:200])
    state = pipeline(source=str(demo_source), data_dir=str(tmp_path / "data"), max_tokens=64, return_state=True)
    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id
    first_children = set(child_flow_run_ids(flow_run_id))

    shutil.copy(backup, broken)  # repaired
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT)}
    retry = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "flow-run", "retry", str(flow_run_id), "--entrypoint", "flows/pipeline.py:pipeline"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-2000:]

    with get_client(sync_client=True) as client:
        retried = client.read_flow_run(UUID(str(flow_run_id)))
    assert retried.state.is_completed(), retried.state.message
    assert retried.run_count >= 2, "the same flow run ran again"
    new_children = set(child_flow_run_ids(flow_run_id)) - first_children
    runs = task_runs_of(list(new_children), expected=12)
    ran = sorted(r.name for r in runs if r.state.message and not r.state.message.startswith("skipped"))
    skipped = [r.name for r in runs if (r.state.message or "").startswith("skipped")]
    assert ran == [f"{stage}-data-00001-of-00003" for stage in ("chunk", "download", "embed", "summarize")], ran
    assert len(skipped) == 8, "the shards that had succeeded were skipped, not redone"
