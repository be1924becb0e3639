"""The one place that turns (data dir, dataset, stage, shard) into paths; nobody else joins strings into DATA_DIR.

    <data_dir>/<name>/<split>/<shard>.arrow                              download
    <data_dir>/<name>-chunked-<T>/<split>/<shard>.parquet                chunk
    <data_dir>/<name>-chunked-<T>-<model>/<split>/<shard>.parquet        embed
    <data_dir>/<name>-chunked-<T>/_summary/<split>/<shard>.json          summarize
    <data_dir>/<dataset>/_ledger/<stage>/<split>/<shard>.json            ledger (written last)
    <data_dir>/<dataset>/<split>/.parts/<shard>-<fingerprint>/           embed parts, until joined
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SOURCE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json")
# What `save_to_disk` writes beside its Arrow shards: a folder it wrote (or a download of ours) is a valid source.
SAVE_TO_DISK_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")
_OUTPUT_SUFFIX = {"download": ".arrow", "chunk": ".parquet", "embed": ".parquet", "summarize": ".json"}
_INPUT_STAGE = {"chunk": "download", "embed": "chunk", "summarize": "chunk"}


@dataclass(frozen=True)
class Layout:
    """Paths of one dataset's shards through every stage."""

    data_dir: str
    name: str
    split: str
    max_tokens: int
    model_slug: str

    def dataset_name(self, stage: str) -> str:
        """The folder name under data_dir that a stage writes into."""
        if stage == "download":
            return self.name
        if stage in ("chunk", "summarize"):
            return f"{self.name}-chunked-{self.max_tokens}"
        if stage == "embed":
            return f"{self.name}-chunked-{self.max_tokens}-{self.model_slug}"
        raise ValueError(f"unknown stage {stage!r}")

    def dataset_dir(self, stage: str) -> Path:
        """`data_dir/<dataset name of the stage>`."""
        return Path(self.data_dir) / self.dataset_name(stage)

    def shard_dir(self, stage: str) -> Path:
        """The folder holding a stage's per-shard outputs."""
        if stage == "summarize":
            return self.dataset_dir(stage) / "_summary" / self.split
        return self.dataset_dir(stage) / self.split

    def output_path(self, stage: str, shard: str) -> Path:
        """Where a stage writes one shard's result."""
        return self.shard_dir(stage) / f"{shard}{_OUTPUT_SUFFIX[stage]}"

    def parts_dir(self, stage: str, shard: str, fingerprint: str) -> Path:
        """Where a stage keeps one shard's finished parts until they are joined (per config, so stale parts never mix in)."""
        return self.shard_dir(stage) / ".parts" / f"{shard}-{fingerprint}"

    def input_path(self, stage: str, shard: str) -> Path:
        """Where a stage reads one shard from (the previous stage's output)."""
        return self.output_path(_INPUT_STAGE[stage], shard)

    def input_stage(self, stage: str) -> str:
        """The stage whose output this stage reads."""
        return _INPUT_STAGE[stage]

    def ledger_dir(self, stage: str) -> Path:
        """The folder of one stage's ledger records."""
        return self.dataset_dir(stage) / "_ledger" / stage / self.split

    def ledger_path(self, stage: str, shard: str) -> Path:
        """The ledger record of one shard of one stage."""
        return self.ledger_dir(stage) / f"{shard}.json"

    def lease_path(self, stage: str, shard: str) -> Path:
        """The lease a run holds on one shard of one stage while it works on it."""
        return self.ledger_path(stage, shard).with_suffix(".lease")

    def summary_dir(self) -> Path:
        """Where the summarize stage puts its dataset-wide report."""
        return self.dataset_dir("summarize") / "_summary"

    def list_shards(self, stage: str) -> list[str]:
        """The shards a stage can run on: the stems of its input files, sorted. For download, every shard of
        the dataset it has made or tried: its Arrow files and its ledger records (a failed one has no file)."""
        if stage == "download":
            recorded = _stems(self.ledger_dir("download"), ".json")
            return sorted(_stems(self.shard_dir("download"), ".arrow") | recorded)
        return sorted(_stems(self.shard_dir(_INPUT_STAGE[stage]), _OUTPUT_SUFFIX[_INPUT_STAGE[stage]]))

    def dataset_shards(self) -> list[str]:
        """Every shard the dataset has: all the download stage made or tried, and any chunked since."""
        return sorted(set(self.list_shards("download")) | set(self.list_shards("embed")))


def _stems(folder: Path, suffix: str) -> set[str]:
    """The names of a folder's files ending in `suffix`, less the suffix (none when there is no folder)."""
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith(".")}


def list_source_files(folder: str | Path) -> list[Path]:
    """The shard files of a local source folder: parquet, arrow and jsonl, one file per shard, sorted by name."""
    root = Path(folder)
    files = sorted(
        p for p in root.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES and not p.name.startswith(".") and p.name not in SAVE_TO_DISK_METADATA
    )
    stems = [p.stem for p in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"source folder {root} has several files per shard name: {duplicates}")
    return files
