"""A process killed (SIGKILL) while it writes a shard: nothing partial under the final name, no done record,
and a rerun gives exactly a clean run's output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.corpus import web_like_documents
from fineweb_modal.ledger import Ledger
from fineweb_modal.shards import ShardJob, layout_for, run_shard
from tests.conftest import write_parquet

RUN_ONE_SHARD = """
import sys
import fineweb_modal.embedding as embedding
embedding.READ_BLOCK_ROWS = int(sys.argv[2])
from fineweb_modal.shards import ShardJob, run_shard
run_shard(ShardJob.model_validate_json(sys.argv[1]))
"""


def start_shard(job: ShardJob, block_rows: int = 8192) -> subprocess.Popen:
    """Run one shard job in a child process (as the local backend does), so it can be killed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.Popen([sys.executable, "-c", RUN_ONE_SHARD, job.model_dump_json(), str(block_rows)], env=env)


def run_shard_process(job: ShardJob, block_rows: int) -> int:
    """Run one shard job in a child process to the end; its exit code."""
    return start_shard(job, block_rows).wait()


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the shard finished before it could be killed: make it bigger"
        assert time.monotonic() < deadline, "the shard never reached the point to kill it at"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture
def dataset(tmp_path, run_config_for):
    """One web-like source shard, downloaded into two data dirs: one to kill, one for a clean run."""

    def build(tokens: int):
        docs = web_like_documents(tokens, seed=5)
        source = write_parquet(tmp_path / "source" / "web" / "s0.parquet", [{"id": f"d{i}", "text": t, "url": f"https://example.org/{i}", "score": 3.0, "dump": "test"} for i, t in enumerate(docs)]).parent
        runs = []
        for name in ("killed", "clean"):
            run = run_config_for(source, data_dir=str(tmp_path / name), max_tokens=128)
            run_shard(ShardJob(stage="download", shard="s0", run=run, source_file=str(source / "s0.parquet")))
            runs.append(run)
        return runs

    return build


def test_chunk_killed_mid_write_leaves_nothing_and_reruns_to_the_same_bytes(dataset):
    killed, clean = dataset(400_000)
    job = ShardJob(stage="chunk", shard="s0", run=killed)
    output = layout_for(killed).output_path("chunk", "s0")
    kill_when(start_shard(job), lambda: any(output.parent.glob(f".{output.name}.*.tmp")))
    assert not output.exists(), "no partial file under the final name"
    assert Ledger(layout_for(killed)).read("chunk", "s0") is None, "no done record"
    assert list(output.parent.glob(".*.tmp")), "the killed writer's temp file is there (until the rerun)"

    assert run_shard(job).status == "done"
    assert not list(output.parent.glob(".*.tmp")), "the rerun removed the killed writer's temp file"
    run_shard(ShardJob(stage="chunk", shard="s0", run=clean))
    assert output.read_bytes() == layout_for(clean).output_path("chunk", "s0").read_bytes(), "deterministic: same bytes as a clean run"


def test_embed_killed_mid_shard_resumes_and_matches_a_clean_run(dataset):
    killed, clean = dataset(12_000)
    for run in (killed, clean):
        run_shard(ShardJob(stage="chunk", shard="s0", run=run))
    job = ShardJob(stage="embed", shard="s0", run=killed)
    layout = layout_for(killed)
    parts = layout.output_path("embed", "s0").parent / ".parts"
    kill_when(start_shard(job, block_rows=16), lambda: len(list(parts.glob("*/part-*.parquet"))) >= 2)
    assert not layout.output_path("embed", "s0").exists() and Ledger(layout).read("embed", "s0") is None
    kept = len(list(parts.glob("*/part-*.parquet")))

    assert run_shard_process(job, block_rows=16) == 0, "the rerun completes it"
    assert Ledger(layout).read("embed", "s0").status == "done"
    assert not list(parts.glob("*/*")), "the parts were joined and removed"
    assert run_shard_process(ShardJob(stage="embed", shard="s0", run=clean), block_rows=16) == 0  # same blocks, no kill
    ours = pq.read_table(layout.output_path("embed", "s0"))
    reference = pq.read_table(layout_for(clean).output_path("embed", "s0"))
    assert ours.num_rows == reference.num_rows == pq.read_metadata(layout.output_path("chunk", "s0")).num_rows > 16 * kept
    assert ours.select(["id", "doc_index", "chunk_index"]).equals(reference.select(["id", "doc_index", "chunk_index"])), "no row lost or doubled"
    a, b = (np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in (ours, reference))
    assert np.array_equal(a, b), "on CPU the resumed shard's vectors are identical to a clean run's"


def test_ctrl_c_stops_a_local_run_without_running_its_queued_shards_and_a_rerun_completes(prefect_api, tmp_path, capsys):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once the embed stage is under way."""
    from fineweb_modal.demo import write_demo_source
    from flows.cli import main

    n_shards = 8
    source = write_demo_source(tmp_path / "source" / "ctrlc", n_docs=20 * n_shards, n_shards=n_shards)
    data = tmp_path / "data"
    argv = ["run", "--source", str(source), "--data-dir", str(data), "--stages", "download,chunk,embed"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(Path(__file__).parents[2])}
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def embed_records() -> list[str]:
        return [p.read_text() for p in data.glob("*/_ledger/embed/**/*.json")]

    deadline = time.monotonic() + 180
    while not any('"done"' in r for r in embed_records()):
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the embed stage never started"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    log = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, log[-3000:]
    assert "Execution was aborted by an interrupt signal" in log
    assert "Interrupted: what finished is recorded. Resume (done shards are skipped):" in log and f"--source {source}" in log
    assert not log.rstrip().endswith("KeyboardInterrupt"), "no traceback of our own at the end"
    done = sum('"done"' in r for r in embed_records())
    assert done < n_shards, "the shards queued behind the running one did not run"
    outputs = list(data.glob("*-chunked-*-*/train/*.parquet"))
    assert len(outputs) == done, "an output exists only with its done record"

    assert main(argv) == 0, "the rerun completes what the interrupt left"
    assert main(["verify", "--name", "ctrlc", "--data-dir", str(data)]) == 0
    assert f"embed      {n_shards} ok ({done} skipped)" in capsys.readouterr().out
