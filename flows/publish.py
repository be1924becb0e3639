"""publish: chunks + embeddings as one Hugging Face dataset; `dry_run` writes the exact folder instead of uploading."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from fineweb_modal.config import build_run_config
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL
from fineweb_modal.phrasing import listing
from fineweb_modal.publish import build_folder, check_repo_id, clear_folder, hub_write_problem, upload_folder, upload_may_pass_again
from fineweb_modal.report import artifact_key
from fineweb_modal.selection import select_shards
from fineweb_modal.shards import layout_for
from fineweb_modal.verify import made_with, mixed_settings
from flows.hooks import dataset_run_name
from flows.outcome import refused
from tasks.secrets import HF_TOKEN_BLOCK, HF_TOKEN_ENV, secret_value
from tasks.shard_tasks import retry_when



def _hf_token() -> str:
    """The Hub token from `HF_TOKEN` or the Prefect Secret `hf-token`; never a parameter, never logged."""
    if token := secret_value(HF_TOKEN_ENV, HF_TOKEN_BLOCK):
        return token
    raise ConfigError(f"publishing needs a Hub token: set {HF_TOKEN_ENV} or create the Prefect Secret block '{HF_TOKEN_BLOCK}'")


# Retried when the network or a bad minute of the Hub failed it; not when the Hub refused it.
@task(name="upload", retries=3, retry_delay_seconds=[10, 60, 300], retry_condition_fn=retry_when(upload_may_pass_again), cache_policy=NO_CACHE)
def upload_task(folder: str, repo_id: str, private: bool) -> str:
    """Upload the prepared folder (retried: the Hub has bad minutes)."""
    return upload_folder(Path(folder), repo_id, _hf_token(), private)


@flow(name="publish", flow_run_name=dataset_run_name)
def publish(
    repo_id: str,
    name: str,
    data_dir: str = "./data",
    split: str = "train",
    max_tokens: int | str = "auto",
    model: str = DEFAULT_MODEL,
    prefix: str = "",
    shards: list[str | int] | str | int | None = None,
    dry_run: bool = False,
    output_dir: str | None = None,
    private: bool = True,
    allow_partial: bool = False,
) -> str:
    """Join every embedded shard's chunks and vectors, write the dataset card, and upload (or only write, with dry_run).

    A dataset with shards not embedded (failed or not yet run at any stage) is refused unless `allow_partial`.
    """
    # All: every shard the dataset has (one whose download failed too); chosen: among the chunked, as `fetch` counts them.
    try:
        run = build_run_config(name=name, data_dir=data_dir, split=split, stages=["embed"], max_tokens=max_tokens, model=model, prefix=prefix, shards=shards)
        layout = layout_for(run)
        chosen = select_shards(layout.list_shards("embed"), run.shards) if run.shards else layout.dataset_shards()
        embedded = [s for s in chosen if layout.output_path("embed", s).is_file()]
        not_embedded = [s for s in chosen if s not in embedded]
        check_repo_id(repo_id)
        if not dry_run and (problem := hub_write_problem(repo_id, _hf_token())):
            raise ConfigError(problem)  # no token, or one that cannot publish there: before any work
        if not embedded:
            raise ConfigError(f"no embedded shards for {name} in {layout.shard_dir('embed')}")
        if not_embedded and not allow_partial:
            raise ConfigError(
                f"{len(not_embedded)} of {len(chosen)} shard(s) of {name} are not embedded ({listing(not_embedded)}): "
                f"finish them (`status` says why), or publish the {len(embedded)} that are with allow_partial (--allow-partial)"
            )
        if mixed := mixed_settings({shard: made_with(layout, shard) for shard in embedded}):
            raise ConfigError(mixed)  # one dataset, one card: vectors made with two prefixes would not be comparable
        if output_dir is not None:
            clear_folder(Path(output_dir))  # last: nothing of an earlier publish goes when the run is refused
    except ConfigError as exc:
        return refused("publish", exc)  # a message, not a traceback
    if not_embedded:
        get_run_logger().warning("publishing %d of %d shard(s); left out, not embedded: %s", len(embedded), len(chosen), listing(not_embedded))
    folder = Path(output_dir or tempfile.mkdtemp(prefix="fineweb-modal-publish-"))
    try:
        manifest = build_folder(layout, repo_id, model, folder, embedded, left_out=not_embedded)
        get_run_logger().info("prepared %d file(s) in %s", len(manifest["files"]), folder)
        create_markdown_artifact(
            (folder / "README.md").read_text() + f"\n\nFiles: {', '.join(manifest['files'])}",
            key=artifact_key("publish", name, "card"),
            description=f"publish · {repo_id}" + (" (dry run)" if dry_run else ""),
        )
        if dry_run:
            return Completed(message=f"dry run: {len(embedded)} shard(s) written to {folder}", data=str(folder))
        try:
            url = upload_task(str(folder), repo_id, private)
        except Exception as exc:  # after its retries, or refused by the Hub: the run ends Failed saying so
            said = f"the upload to {repo_id} failed ({type(exc).__name__}: {exc})"
            return Failed(message=f"publish: {said}", data=RuntimeError(said))
    finally:
        if output_dir is None and not dry_run:
            shutil.rmtree(folder, ignore_errors=True)  # a full copy of the dataset: uploaded or not, it goes
    create_link_artifact(url, link_text=repo_id, key=artifact_key("publish", name, "link"))
    return Completed(message=f"{len(embedded)} shard(s) uploaded to {url}", data=url)
