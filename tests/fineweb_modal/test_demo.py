"""The demo source: written once, left alone when it would be the same bytes (so a second `make demo` skips)."""

from __future__ import annotations

import pyarrow.parquet as pq

from fineweb_modal.demo import write_demo_source


def test_the_demo_source_is_not_rewritten_when_unchanged(tmp_path):
    folder = write_demo_source(tmp_path / "demo", n_docs=12, n_shards=2)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}
    assert len(stamps) == 2 and sum(pq.read_metadata(p).num_rows for p in folder.glob("*.parquet")) == 12
    write_demo_source(folder, n_docs=12, n_shards=2)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")} == stamps
    write_demo_source(folder, n_docs=14, n_shards=2)  # other documents: rewritten
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in folder.glob("*.parquet"))
