"""What the ledger says about a data dir: per dataset and stage, shards done, failed, missing and stale, with totals, and whether the done ones were made alike."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fineweb_modal.layout import Layout
from fineweb_modal.ledger import Ledger, ShardRecord, count_rows
from fineweb_modal.storage import read_json
from fineweb_modal.verify import made_with, mixed_settings

_DERIVED = re.compile(r"^(?P<name>.+)-chunked-(?P<tokens>\d+)(?:-(?P<model>.+))?$")
_INPUT_SUFFIX = {"download": None, "chunk": ".arrow", "embed": ".parquet", "summarize": ".parquet"}


@dataclass
class StageStatus:
    """One stage of one dataset and split, as its ledger records and files say."""

    dataset: str
    stage: str
    split: str
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # done, but made from an input that has since been replaced
    mixed: str = ""  # the done shards' files were made with different settings: which, and the shards of each value
    docs: int = 0
    chunks: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cost_usd: float = 0.0
    modal_estimate_usd: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing failed, missing or stale, and the done shards made alike."""
        return not (self.failed or self.missing or self.stale or self.mixed)

    def as_dict(self) -> dict:
        """A JSON-ready view (for `fineweb-modal status --json`)."""
        return {**self.__dict__, "counts": {"done": len(self.done), "failed": len(self.failed), "missing": len(self.missing), "stale": len(self.stale)}}

    @classmethod
    def from_dict(cls, view: dict) -> StageStatus:
        """Back from as_dict (as a Modal function returns it)."""
        return cls(**{k: v for k, v in view.items() if k != "counts"})


def _input_dir(data_dir: Path, dataset: str, stage: str, split: str) -> Path | None:
    match = _DERIVED.match(dataset)
    if stage == "chunk" and match:
        return data_dir / match["name"] / split
    if stage == "embed" and match and match["model"]:
        return data_dir / f"{match['name']}-chunked-{match['tokens']}" / split
    if stage == "summarize":
        return data_dir / dataset / split
    return None


def _ledger_of(data_dir: Path, dataset: str, stage: str, split: str) -> Ledger | None:
    """The ledger of a derived dataset's stage, laid out so its inputs can be found (None for download)."""
    match = _DERIVED.match(dataset)
    if stage == "download" or not match:
        return None
    return Ledger(Layout(data_dir=str(data_dir), name=match["name"], split=split, max_tokens=int(match["tokens"]), model_slug=match["model"] or ""))


def _stems(folder: Path | None, suffix: str | None) -> set[str]:
    """The shard names of a folder's files ending in `suffix` (none for no folder)."""
    if folder is None or suffix is None or not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob(f"*{suffix}") if not p.name.startswith(".")}


def _source_shards(root: Path, name: str, split: str) -> set[str]:
    """Every shard the download stage has: its files, and its ledger's records (a failed one has no file)."""
    return set(Layout(data_dir=str(root), name=name, split=split, max_tokens=0, model_slug="").list_shards("download"))


def ledger_status(data_dir: str | Path, name: str | None = None) -> list[StageStatus]:
    """Every (dataset, stage, split) with ledger records under `data_dir`, optionally only datasets of `name`."""
    root = Path(data_dir)
    statuses = []
    for stage_dir in sorted(root.glob("*/_ledger/*/*")):
        dataset, stage, split = stage_dir.parts[-4], stage_dir.parts[-2], stage_dir.parts[-1]
        if name and dataset != name and not dataset.startswith(f"{name}-chunked-"):
            continue
        status = StageStatus(dataset=dataset, stage=stage, split=split)
        ledger = _ledger_of(root, dataset, stage, split)
        recorded = set()
        for path in sorted(stage_dir.glob("*.json")):
            try:
                record = ShardRecord.model_validate(read_json(path))
            except (OSError, ValueError):
                continue
            recorded.add(record.shard)
            if record.status == "failed":
                status.failed[record.shard] = record.error or "failed"
                continue
            output = root / record.output if record.output else None
            if output is None or count_rows(output) != record.rows_out:
                status.missing.append(record.shard)  # done once, but its output is gone or changed
                continue
            if ledger is not None and ledger.outdated(record):
                status.stale.append(record.shard)
                continue
            status.done.append(record.shard)
            status.docs += int(record.stats.get("docs", 0))
            status.chunks += int(record.stats.get("chunks", 0))
            status.tokens += int(record.stats.get("tokens", 0))
            status.seconds += float(record.stats.get("seconds", 0.0))
            status.cost_usd += float(record.stats.get("cost_usd", 0.0))
            status.modal_estimate_usd += float(record.stats.get("modal_estimate_usd", 0.0))
        expected = _stems(_input_dir(root, dataset, stage, split), _INPUT_SUFFIX[stage])
        if stage != "download" and (match := _DERIVED.match(dataset)):
            expected |= _source_shards(root, match["name"], split)  # a shard whose download failed has no input yet
        status.missing += sorted(expected - recorded)
        if ledger is not None and stage in ("chunk", "embed"):
            status.mixed = mixed_settings({shard: made_with(ledger.layout, shard, (stage,)) for shard in status.done})
        statuses.append(status)
    return statuses
