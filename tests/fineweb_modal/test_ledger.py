"""A done record is trusted only with a matching fingerprint and an output that still has its rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_modal.layout import Layout
from fineweb_modal.ledger import SCHEMA_VERSION, Ledger


def make(tmp_path):
    layout = Layout(data_dir=str(tmp_path), name="d", split="train", max_tokens=64, model_slug="m")
    output = layout.output_path("chunk", "s0")
    output.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), output)
    return layout, Ledger(layout), output


def test_done_record_round_trip(tmp_path):
    layout, ledger, _ = make(tmp_path)
    ledger.write_done("chunk", "s0", "fp1", 3, {"tokens": 10}, attempts=2)
    record = ledger.done_record("chunk", "s0", "fp1")
    assert record is not None and record.stats == {"tokens": 10} and record.attempts == 2
    assert record.output == "d-chunked-64/train/s0.parquet"
    payload = json.loads(layout.ledger_path("chunk", "s0").read_text())
    assert payload["schema_version"] == SCHEMA_VERSION and payload["status"] == "done"


def test_other_fingerprint_missing_output_or_wrong_rows_is_not_done(tmp_path, caplog):
    _, ledger, output = make(tmp_path)
    ledger.write_done("chunk", "s0", "fp1", 3, {}, 1)
    assert ledger.done_record("chunk", "s0", "fp2") is None
    pq.write_table(pa.table({"x": [1, 2]}), output)
    assert ledger.done_record("chunk", "s0", "fp1") is None
    assert "ledger says done with 3 rows but" in caplog.text and "has 2; redoing it" in caplog.text, "the disagreement is logged"
    output.unlink()
    caplog.clear()
    assert ledger.done_record("chunk", "s0", "fp1") is None
    assert "is missing or unreadable; redoing it" in caplog.text


def test_failed_record_keeps_error_and_attempts(tmp_path):
    _, ledger, _ = make(tmp_path)
    try:
        raise ValueError("broken row 7")
    except ValueError as exc:
        ledger.write_failed("chunk", "s0", "fp1", exc, attempts=3)
    record = ledger.read("chunk", "s0")
    assert record.status == "failed" and record.error == "ValueError: broken row 7" and record.attempts == 3
    assert "broken row 7" in record.stats["traceback"]
    assert ledger.done_record("chunk", "s0", "fp1") is None
    assert [r.shard for r in ledger.records("chunk")] == ["s0"]


def test_unknown_schema_version_or_garbage_is_ignored(tmp_path):
    layout, ledger, _ = make(tmp_path)
    path = layout.ledger_path("chunk", "s0")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert ledger.read("chunk", "s0") is None
    path.write_text(json.dumps({"schema_version": 999}))
    assert ledger.read("chunk", "s0") is None
