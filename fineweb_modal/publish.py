"""Chunks + embeddings as one Hugging Face dataset: a parquet file per shard (chunk columns + `embedding`) and a card."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from fineweb_modal.costs import format_usd
from fineweb_modal.download import HUB_TIMEOUT_S
from fineweb_modal.errors import ConfigError, is_transient
from fineweb_modal.layout import Layout
from fineweb_modal.phrasing import listing
from fineweb_modal.status import ledger_status
from fineweb_modal.storage import atomic_path, recorded_chunk_config
from fineweb_modal.verify import outdated_stages


def join_shard(layout: Layout, shard: str, destination: Path) -> int:
    """Write one shard's chunk rows with their embedding column (row for row) to `destination`; returns rows."""
    if outdated_stages(layout, shard, ("embed",)):
        raise ValueError(f"{shard}: its embeddings were made from a chunk file since replaced; rerun the embed stage")
    chunks = pq.read_table(layout.output_path("chunk", shard))
    embeddings = pq.read_table(layout.output_path("embed", shard))
    if embeddings.num_rows != chunks.num_rows or not embeddings.column("chunk_index").equals(chunks.column("chunk_index")):
        raise ValueError(f"{shard}: embeddings do not line up with chunks ({embeddings.num_rows} vs {chunks.num_rows} rows); run verify")
    joined = chunks.append_column("embedding", embeddings.column("embedding"))
    metadata = {**(chunks.schema.metadata or {}), **(embeddings.schema.metadata or {})}
    with atomic_path(destination) as tmp:
        pq.write_table(joined.replace_schema_metadata(metadata), tmp, compression="zstd")
    return joined.num_rows


def _overlap(chunk_config: dict[str, Any]) -> str:
    return f"{chunk_config['overlap']:.0%}" if "overlap" in chunk_config else "unrecorded"


def dataset_card(
    repo_id: str, layout: Layout, model: str, rows: dict[str, int], embed_meta: dict[str, str], left_out: Sequence[str] = (), chunk_config: dict[str, Any] | None = None
) -> str:
    """The README.md of the published dataset: where it came from, how it was cut and embedded, what it cost."""
    chunk_config = chunk_config or {}
    statuses = {s.stage: s for s in ledger_status(layout.data_dir, layout.name) if s.split == layout.split}
    cost = sum(s.cost_usd for s in statuses.values())
    tokens = statuses["embed"].tokens if "embed" in statuses else 0
    front = f"""---
configs:
- config_name: default
  data_files:
  - split: {layout.split}
    path: data/{layout.split}/*.parquet
---
"""
    lines = [
        f"# {repo_id}",
        "",
        f"Chunks and embeddings of `{layout.name}` ({layout.split}), made with fineweb-modal (a Prefect pipeline over Modal).",
        "",
        "| | |",
        "|---|---|",
        f"| shards | {len(rows)}" + (f" of {len(rows) + len(left_out)}: not embedded, left out: {', '.join(left_out)}" if left_out else "") + " |",
        f"| chunks | {sum(rows.values()):,} |",
        f"| embedded tokens | {tokens:,} |",
        f"| chunking | max {layout.max_tokens} tokens per chunk ([CLS]/[SEP] included), {_overlap(chunk_config)} overlap, `{chunk_config.get('model', model)}`'s tokenizer, "
        f"text column `{chunk_config.get('text_column', 'text')}`; exact source substrings with `char_start`/`char_end` |",
        f"| model | `{model}` (revision {embed_meta.get('revision', '?')}), {embed_meta.get('dims', '?')} dims, {embed_meta.get('pooling', '?')} pooling, "
        f"prefix {repr(embed_meta['prefix']) if embed_meta.get('prefix') else 'none'}, {embed_meta.get('dtype', 'float32')}, L2-normalized |",
        f"| compute cost | {format_usd(cost)} (Modal container seconds × published rates; $0 for local runs) |",
        "",
        "Columns: `id`, `doc_index`, `chunk_index` (`(doc_index, chunk_index)` is unique per shard), `chunk_text`, "
        "`char_start`, `char_end`, `chunk_token_count`, the kept source columns, and `embedding`.",
    ]
    return front + "\n".join(lines) + "\n"


MANIFEST = ".publish.json"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_repo_id(repo_id: str) -> None:
    """Refuse what cannot be a Hub dataset id (`org/name`), before any work (a dry run too)."""
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise ConfigError(f"repo_id {repo_id!r} is not a Hub dataset id: write it as org/name (letters, digits, '-', '_', '.')")


def clear_folder(folder: Path) -> None:
    """Make `folder` ready to be filled and uploaded whole: new, empty, or an earlier publish's (whose files go).

    A file, or a folder holding anything else, is refused: every file in it would be uploaded.
    """
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file: give a folder to write the dataset into")
    if not folder.is_dir():
        return
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    manifest = folder / MANIFEST
    try:
        earlier = {*json.loads(manifest.read_text())["files"], MANIFEST} if manifest.is_file() else set()
    except (ValueError, KeyError, TypeError):  # not a manifest this tool wrote: its folder's files are no publish's
        earlier = set()
    if strangers := sorted(present - earlier):
        raise ConfigError(f"{folder} holds files that an upload would take along ({listing(strangers)}): give an empty or new folder")
    for name in sorted(present):
        (folder / name).unlink()  # an earlier publish's shards and card: a shard left out now must not go up with the new ones


def build_folder(layout: Layout, repo_id: str, model: str, folder: Path, shards: list[str], left_out: Sequence[str] = ()) -> dict[str, Any]:
    """Write exactly what would be uploaded: `data/<split>/<shard>.parquet` and `README.md` (naming the shards `left_out`)."""
    planned = [f"data/{layout.split}/{shard}.parquet" for shard in shards] + ["README.md"]
    folder.mkdir(parents=True, exist_ok=True)
    # First: a build that fails halfway leaves a folder the next publish knows as its own, and clears.
    (folder / MANIFEST).write_text(json.dumps({"repo_id": repo_id, "files": planned}, indent=2))
    rows = {shard: join_shard(layout, shard, folder / "data" / layout.split / f"{shard}.parquet") for shard in shards}
    first = pq.read_schema(layout.output_path("embed", shards[0])).metadata or {}
    embed_meta = {k.decode().removeprefix("fineweb_modal."): v.decode() for k, v in first.items()}
    chunk_config = recorded_chunk_config(pq.read_schema(layout.output_path("chunk", shards[0])))
    (folder / "README.md").write_text(dataset_card(repo_id, layout, model, rows, embed_meta, list(left_out), chunk_config))
    manifest = {"repo_id": repo_id, "rows": rows, "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _network_failed(exc: BaseException) -> bool:
    """Whether the Hub client's request failed in the network (DNS, refused, TLS, timeout); by class name, as its HTTP
    library is httpx or its fork httpx2, which name their errors alike."""
    return bool({kind.__name__ for kind in type(exc).__mro__} & {"NetworkError", "TimeoutException"})


def hub_write_problem(repo_id: str, token: str) -> str | None:
    """Why `token` cannot publish `repo_id` from here, as the Hub's whoami says (None when it can, or the Hub cannot say
    just now): the Hub unreachable, the token refused or read-only, or `repo_id`'s owner neither its account nor one of its orgs."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    try:
        response = get_session().get(f"{constants.ENDPOINT}/api/whoami-v2", headers=build_hf_headers(token=token), timeout=HUB_TIMEOUT_S)
    except Exception as exc:
        if _network_failed(exc) or type(exc).__name__ == "OfflineModeIsEnabled":
            return f"cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}: {str(exc).replace(token, '***')}): check the network, then rerun"
        # Anything else, e.g. a token no HTTP header can carry: its text would show the token, so only the kind is said.
        return f"the Hub token cannot be sent ({type(exc).__name__}): check HF_TOKEN or the Prefect Secret block 'hf-token'"
    if response.status_code == 401:
        return "the Hub refused the token (HTTP 401: invalid credentials): set a valid HF_TOKEN or Prefect Secret block 'hf-token'"
    try:
        account = response.json() if response.status_code == 200 else None
    except ValueError:
        account = None
    if not isinstance(account, dict):  # rate-limited (whoami is strict), a bad minute, a proxy's page: the upload will say
        return None
    if ((account.get("auth") or {}).get("accessToken") or {}).get("role") == "read":
        return f"the Hub token of {account.get('name')} is read-only: publishing needs a token with write access"
    if account.get("type") != "user":  # an app's or an org's token: whom it may write for is not checked here
        return None
    owners = [account.get("name"), *((org or {}).get("name") for org in account.get("orgs") or [])]
    if (owner := repo_id.split("/")[0]).casefold() not in {str(o).casefold() for o in owners if o}:
        return f"the Hub token is {account.get('name')}'s, who cannot create datasets under {owner!r} (it can under: {listing([o for o in owners if o])})"
    return None


def upload_may_pass_again(exc: BaseException) -> bool:
    """Whether an upload that failed with `exc` may pass when tried again: the network, or the Hub's 429 and 5xx;
    not a refusal (401, 403: a token without write access to that repo; 404, 409, 413…)."""
    if is_transient(exc) or _network_failed(exc):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


def upload_folder(folder: Path, repo_id: str, token: str, private: bool = True) -> str:
    """Create the dataset repo if needed and upload the folder; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder), ignore_patterns=[MANIFEST])
    return f"https://huggingface.co/datasets/{repo_id}"
