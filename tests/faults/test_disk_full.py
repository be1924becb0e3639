"""Out of disk: a write that hits ENOSPC fails the shard cleanly; a stage that clearly will not fit never starts."""

from __future__ import annotations

import errno

import pyarrow.parquet as pq
import pytest

from fineweb_modal import diskspace
from fineweb_modal.errors import DiskSpaceError, is_transient
from fineweb_modal.ledger import Ledger
from fineweb_modal.shards import ShardJob, layout_for, run_shard


@pytest.fixture
def downloaded(demo_source, run_config_for):
    run = run_config_for(demo_source)
    shards = {}
    for path in sorted(demo_source.glob("*.parquet")):
        run_shard(ShardJob(stage="download", shard=path.stem, run=run, source_file=str(path)))
        shards[path.stem] = {"source_file": str(path)}
    return run, shards


def test_enospc_while_writing_fails_the_shard_cleanly(downloaded, monkeypatch):
    run, shards = downloaded
    shard = next(iter(shards))
    written = []

    def full_disk(self, table, *args, **kwargs):
        written.append(table.num_rows)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(OSError, match=r"out of disk space while writing the chunk output of .* free now\); nothing partial was kept") as caught:
        run_shard(ShardJob(stage="chunk", shard=shard, run=run))
    assert written, "the failure came from the write"
    assert caught.value.errno == errno.ENOSPC and not is_transient(caught.value), "not retried: the disk stays full"
    output = layout_for(run).output_path("chunk", shard)
    assert not output.exists() and not list(output.parent.glob(".*.tmp")), "nothing partial remains"
    record = Ledger(layout_for(run)).read("chunk", shard)
    assert record.status == "failed" and "out of disk space" in record.error

    monkeypatch.undo()
    assert run_shard(ShardJob(stage="chunk", shard=shard, run=run)).status == "done", "with room again, a rerun completes it"


def test_the_estimate_is_close_to_what_the_stages_write(downloaded):
    run, shards = downloaded
    layout = layout_for(run)
    estimate = diskspace.estimate_stage_bytes(run, layout, "chunk", shards)
    for shard in shards:
        run_shard(ShardJob(stage="chunk", shard=shard, run=run))
    written = sum(layout.output_path("chunk", s).stat().st_size for s in shards)
    assert 0.5 * written < estimate < 2 * written, (estimate, written)
    embed_estimate = diskspace.estimate_stage_bytes(run, layout, "embed", shards)
    rows = [pq.read_metadata(layout.output_path("chunk", s)).num_rows for s in shards]
    per_row = 384 * 4 + diskspace.ID_BYTES_PER_ROW
    assert embed_estimate == (sum(rows) + max(rows)) * per_row, "every shard once, plus the largest's parts during its join"


def test_a_stage_that_will_not_fit_is_refused_with_the_numbers(downloaded, monkeypatch):
    run, shards = downloaded
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskSpaceError, match=r"chunk: the 3 shard\(s\) to run need about .* KB .* but .* has 1000 B free"):
        diskspace.check_disk_space(run, layout_for(run), "chunk", shards)
    assert diskspace.check_disk_space(run, layout_for(run), "chunk", {}) == 0, "nothing to run, nothing to check"


def test_a_tenth_more_than_the_estimate_is_asked_for(downloaded, monkeypatch):
    """The estimate comes from a sample: 5 % more room than it is refused, 10 % more is enough."""
    run, shards = downloaded
    layout = layout_for(run)
    estimate = diskspace.estimate_stage_bytes(run, layout, "chunk", shards)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: int(estimate * 1.05))
    with pytest.raises(DiskSpaceError, match="10% headroom"):
        diskspace.check_disk_space(run, layout, "chunk", shards)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: int(estimate * 1.1) + 1)
    assert diskspace.check_disk_space(run, layout, "chunk", shards) == int(estimate * 1.1)

def test_the_flow_refuses_before_any_shard_runs(prefect_api, downloaded, monkeypatch):
    from flows.cli import main

    run, _ = downloaded
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1000)
    code = main(["run", "--name", run.dataset.name, "--stages", "chunk", "--data-dir", str(run.dataset.data_dir), "--max-tokens", "64"])
    assert code == 2
    assert not list(layout_for(run).shard_dir("chunk").glob("*.parquet")), "no shard ran"


def test_a_shard_without_the_text_column_does_not_stop_the_estimate(downloaded):
    """It counts at its file size; its own task reports the missing column."""
    from tests.conftest import write_arrow_shard

    run, shards = downloaded
    layout = layout_for(run)
    write_arrow_shard(layout.output_path("download", "no-text"), [{"id": "a", "body": "hello"}])
    inputs = {**shards, "no-text": {}}
    assert diskspace.estimate_stage_bytes(run, layout, "chunk", inputs) > diskspace.estimate_stage_bytes(run, layout, "chunk", shards) > 0
