"""Per stage and shard, a JSON record of what happened: `done` (with stats and the config fingerprint) or `failed`.

A `done` record is written only after the output is renamed into place, so a record always describes a
whole file; a record is trusted only while its fingerprint matches and its output still has its rows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import traceback
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from fineweb_modal.layout import Layout
from fineweb_modal.storage import arrow_num_rows, parquet_num_rows, write_json_atomic

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


class ShardRecord(BaseModel):
    """One ledger entry."""

    schema_version: int = SCHEMA_VERSION
    stage: str
    shard: str
    status: Literal["done", "failed"]
    fingerprint: str
    output: str | None = None
    rows_out: int | None = None
    stats: dict[str, Any] = {}
    error: str | None = None
    error_type: str | None = None
    attempts: int = 1
    time: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def count_rows(path: Path) -> int | None:
    """Rows in a stage output (parquet or arrow); None when missing or unreadable."""
    if path.suffix == ".parquet":
        return parquet_num_rows(path)
    if path.suffix == ".arrow":
        return arrow_num_rows(path)
    return 1 if path.is_file() else None


class Ledger:
    """Reads and writes the ledger records of one dataset layout."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def read(self, stage: str, shard: str) -> ShardRecord | None:
        """The current record of a shard, or None when there is none (or it has another schema version)."""
        path = self.layout.ledger_path(stage, shard)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ledger record %s is unreadable; treating the shard as not done", path)
            return None
        if payload.get("schema_version") != SCHEMA_VERSION:
            return None
        return ShardRecord.model_validate(payload)

    def done_record(self, stage: str, shard: str, fingerprint: str) -> ShardRecord | None:
        """The shard's `done` record if it matches `fingerprint` and its output still holds its rows."""
        record = self.read(stage, shard)
        if record is None or record.status != "done" or record.fingerprint != fingerprint:
            return None
        output = self.layout.output_path(stage, shard)
        rows = count_rows(output)
        if rows is None or rows != record.rows_out:
            log.warning("%s/%s: ledger says done with %s rows but %s has %s; redoing it", stage, shard, record.rows_out, output, rows)
            return None
        return record

    def write_done(self, stage: str, shard: str, fingerprint: str, rows_out: int, stats: dict[str, Any], attempts: int) -> ShardRecord:
        """Record a finished shard (call only after its output is in place)."""
        output = self.layout.output_path(stage, shard)
        record = ShardRecord(
            stage=stage,
            shard=shard,
            status="done",
            fingerprint=fingerprint,
            output=str(output.relative_to(self.layout.data_dir)),
            rows_out=rows_out,
            stats=stats,
            attempts=attempts,
            time=_now(),
        )
        write_json_atomic(self.layout.ledger_path(stage, shard), record.model_dump(mode="json"))
        return record

    def write_failed(self, stage: str, shard: str, fingerprint: str, exc: BaseException, attempts: int) -> ShardRecord:
        """Record a shard whose attempt failed, with the error and how many attempts it had."""
        record = ShardRecord(
            stage=stage,
            shard=shard,
            status="failed",
            fingerprint=fingerprint,
            error=f"{type(exc).__name__}: {exc}"[:2000],
            error_type=type(exc).__name__,
            stats={"traceback": "".join(traceback.format_exception(exc))[-4000:]},
            attempts=attempts,
            time=_now(),
        )
        write_json_atomic(self.layout.ledger_path(stage, shard), record.model_dump(mode="json"))
        return record

    def records(self, stage: str) -> list[ShardRecord]:
        """Every record of one stage, sorted by shard."""
        folder = self.layout.ledger_path(stage, "x").parent
        if not folder.is_dir():
            return []
        found = (self.read(stage, p.stem) for p in sorted(folder.glob("*.json")))
        return [r for r in found if r is not None]
