"""The Modal functions' bodies, run offline through `.local()` on a local data dir: same code as the local backend."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fineweb_modal.shards import ShardJob, ShardResult, layout_for
from tasks.backends import MODAL_FUNCTIONS


@pytest.fixture(scope="module")
def modal_app():
    from deployments import modal_app

    return modal_app


def test_every_stage_has_a_function_with_its_resources(modal_app):
    for stage, name in MODAL_FUNCTIONS.items():
        assert hasattr(modal_app, name), f"{stage} has no Modal function {name}"
    for name in ("list_shards", "download_hub", "finalize_stage_fn"):
        assert hasattr(modal_app, name)
    assert modal_app.app.name == "fineweb-modal"


def test_a_stage_keeps_as_many_shards_in_flight_as_its_function_has_containers(modal_app):
    """Else sample-10BT's 99 chunk shards would run in two waves on 100 containers, taking twice as long."""
    from flows.stage import MAX_SHARDS_IN_FLIGHT

    assert MAX_SHARDS_IN_FLIGHT >= max(modal_app.CHUNK_MAX_CONTAINERS, modal_app.EMBED_MAX_CONTAINERS, 99)


def test_model_weights_live_off_the_data_volume_that_is_reloaded_per_shard(modal_app):
    """A loaded model keeps its files open, and Modal refuses to reload a Volume with open files."""
    from pathlib import PurePosixPath

    from tasks.backends import MODAL_DATA_DIR

    assert not PurePosixPath(modal_app.HF_HOME).is_relative_to(MODAL_DATA_DIR)
    assert modal_app.IMAGE_ENV["HF_HOME"] == modal_app.HF_HOME
    functions = [getattr(modal_app, name) for name in MODAL_FUNCTIONS.values()]
    functions.append(modal_app.TEIEmbedder._get_class_service_function())
    for function in functions:
        volumes = function._spec_.volumes  # modal's private spec: what `modal deploy` mounts
        assert set(volumes) == {MODAL_DATA_DIR, modal_app.HF_HOME}


def test_in_a_container_each_shard_that_works_pays_for_the_time_before_it(modal_app, demo_source, run_config_for, monkeypatch):
    """Start-up, model load and Volume sync are billed: a shard's cost covers them, not only its work."""
    from fineweb_modal.costs import ContainerClock, rate_per_second, stage_resources

    now = [1000.0]

    class VolumeOfAContainer:  # a test double: each sync takes 2 s on the fake clock
        def reload(self) -> None:
            now[0] += 2.0

        def commit(self) -> None:
            now[0] += 2.0

    monkeypatch.setattr(modal_app.modal, "is_local", lambda: False)
    monkeypatch.setattr(modal_app, "volume", VolumeOfAContainer())
    monkeypatch.setattr(modal_app, "container_clock", ContainerClock(started=940.0, clock=lambda: now[0]))
    run = run_config_for(demo_source)
    first, second = sorted(demo_source.glob("*.parquet"))[:2]

    def download(source) -> ShardResult:
        job = ShardJob(stage="download", shard=source.stem, run=run, source_file=str(source), where="modal")
        return ShardResult.model_validate(modal_app._run(job.model_dump(mode="json")))

    rate = rate_per_second(stage_resources("download"))
    one = download(first)
    assert one.overhead_seconds == 62.0  # 60 s of start-up, then its reload
    assert one.cost_usd == pytest.approx((one.seconds + 62.0) * rate, rel=1e-3)
    now[0] += 100.0  # the container waits for its next input
    assert download(first).status == "skipped"  # done: bills nothing, its time waits for the next shard
    two = download(second)
    # since the first's work ended: its commit (2), the wait (100), the skipped call's reload and commit (4),
    # this reload (2), less the work seconds the fake clock never saw pass
    assert two.overhead_seconds == pytest.approx(108.0 - one.seconds, abs=2e-3)
    assert two.cost_usd == pytest.approx((two.seconds + two.overhead_seconds) * rate, rel=1e-3)


def test_in_a_container_a_failed_shard_publishes_its_record_at_once(modal_app, demo_source, run_config_for, monkeypatch, tmp_path):
    """A status or retry asked right after a failure must see it, not wait on Modal's background commit."""
    from fineweb_modal.errors import BadDataError

    class VolumeOfAContainer:  # a test double: counts syncs; its commit can be made to fail
        reloads, commits, commit_error = 0, 0, None

        def reload(self) -> None:
            self.reloads += 1

        def commit(self) -> None:
            self.commits += 1
            if self.commit_error:
                raise self.commit_error

    synced = VolumeOfAContainer()
    monkeypatch.setattr(modal_app.modal, "is_local", lambda: False)
    monkeypatch.setattr(modal_app, "volume", synced)
    broken = tmp_path / "data-00009-of-00009.jsonl"
    broken.write_text('{"text": broken')
    run = run_config_for(demo_source)
    job = ShardJob(stage="download", shard=broken.stem, run=run, source_file=str(broken), where="modal").model_dump(mode="json")
    with pytest.raises(BadDataError):
        modal_app._run(job)
    assert (synced.reloads, synced.commits) == (1, 1), "the failed record is committed, not left to a background commit"
    synced.commit_error = RuntimeError("volume conflict")
    with pytest.raises(BadDataError):  # the shard's own error is the one reported, not the commit's
        modal_app._run(job)
    assert synced.commits == 2


def test_a_shard_whose_commit_fails_is_billed_as_a_failed_attempt_work_included(modal_app, demo_source, run_config_for, monkeypatch):
    """The work is done but not on the Volume: the attempt failed, and its error carries the whole container time."""
    import time

    from fineweb_modal.costs import ContainerClock, billed_on, rate_per_second, stage_resources

    class CommitFails:
        def reload(self) -> None:
            pass

        def commit(self) -> None:
            raise ConnectionResetError("volume commit reset")

    monkeypatch.setattr(modal_app.modal, "is_local", lambda: False)
    monkeypatch.setattr(modal_app, "volume", CommitFails())
    monkeypatch.setattr(modal_app, "container_clock", ContainerClock(started=time.monotonic() - 30.0))
    source_file = sorted(demo_source.glob("*.parquet"))[0]
    job = ShardJob(stage="download", shard=source_file.stem, run=run_config_for(demo_source), source_file=str(source_file), where="modal")
    with pytest.raises(ConnectionResetError) as raised:
        modal_app._run(job.model_dump(mode="json"))
    assert billed_on(raised.value) >= 30 * rate_per_second(stage_resources("download")), "the 30 s before and the work"
    assert modal_app.container_clock.unbilled_seconds() < 5, "and the next shard does not pay them again"


def test_functions_run_the_shard_work_locally(modal_app, demo_source, run_config_for):
    run = run_config_for(demo_source)
    source_file = sorted(demo_source.glob("*.parquet"))[0]
    shard = source_file.stem
    results = {}
    for stage, name in MODAL_FUNCTIONS.items():
        job = ShardJob(stage=stage, shard=shard, run=run, source_file=str(source_file) if stage == "download" else None, where="modal")
        results[stage] = ShardResult.model_validate(getattr(modal_app, name).local(job.model_dump(mode="json")))
    assert all(r.status == "done" and r.where == "modal" for r in results.values())
    assert results["embed"].cost_usd > 0 and results["embed"].gpu == "H100"
    layout = layout_for(run)
    chunks = pq.read_table(layout.output_path("chunk", shard))
    assert pq.read_table(layout.output_path("embed", shard)).num_rows == chunks.num_rows == results["chunk"].chunks

    run_json = run.model_dump(mode="json")
    assert modal_app.list_shards.local(run_json, "embed") == [shard]
    outcome = modal_app.finalize_stage_fn.local(run_json, "summarize", [results["summarize"].extra["summary"]])
    assert outcome["totals"]["chunks"] == chunks.num_rows

    again = ShardJob(stage="chunk", shard=shard, run=run, where="modal").model_dump(mode="json")
    assert modal_app.chunk_shard.local(again)["status"] == "skipped"


def test_gpu_picks_the_matching_tei_image(modal_app):
    assert modal_app.tei_image_tag("H100") == "hopper-1.9" == modal_app.tei_image_tag("h100!")
    assert modal_app.tei_image_tag("A100") == "1.9" and modal_app.tei_image_tag("a10g:2") == "86-1.9"
    assert modal_app.tei_image_tag("A10G") == "86-1.9"
    assert modal_app.tei_image_tag("L4") == "89-1.9"
    assert modal_app.tei_image_tag("T4") == "cuda-1.9"


def test_tei_class_embeds_a_shard_through_the_server_it_is_given(modal_app, demo_source, run_config_for):
    from tests.tei_double import TEITestDouble

    double = TEITestDouble().start()
    try:
        run = run_config_for(demo_source, backend="modal", engine="tei")
        source_file = sorted(demo_source.glob("*.parquet"))[0]
        shard = source_file.stem
        for stage in ("download", "chunk"):
            job = ShardJob(stage=stage, shard=shard, run=run, source_file=str(source_file) if stage == "download" else None)
            getattr(modal_app, MODAL_FUNCTIONS[stage]).local(job.model_dump(mode="json"))
        job = ShardJob(stage="embed", shard=shard, run=run, where="modal").model_dump(mode="json")
        result = ShardResult.model_validate(modal_app.TEIEmbedder(tei_url=double.url).embed_shard.local(job))
        assert result.status == "done" and result.chunks == double.metrics.embedded_inputs
        table = pq.read_table(layout_for(run).output_path("embed", shard))
        assert table.num_rows == result.chunks and table.schema.metadata[b"fineweb_modal.engine"] == b"tei test-double"
    finally:
        double.stop()


def test_deploy_settings_travel_to_the_containers_and_a_gpu_without_a_price_is_refused(monkeypatch):
    """The containers import this module again with only the images' environment: the TEI settings must be in it."""
    import importlib

    from deployments import modal_app
    from fineweb_modal.errors import ConfigError

    monkeypatch.setenv("FINEWEB_MODAL_TEI_MODEL", "BAAI/bge-base-en-v1.5")
    monkeypatch.setenv("FINEWEB_MODAL_TEI_MAX_BATCH_TOKENS", "65536")
    try:
        reloaded = importlib.reload(modal_app)
        assert reloaded.IMAGE_ENV["FINEWEB_MODAL_TEI_MODEL"] == "BAAI/bge-base-en-v1.5"
        assert reloaded.IMAGE_ENV["FINEWEB_MODAL_TEI_MAX_BATCH_TOKENS"] == "65536"
        assert int(reloaded.IMAGE_ENV["FINEWEB_MODAL_TEI_MAX_CONCURRENT_REQUESTS"]) * 400 >= 3 * 262_144, "permits for 3 batches"
        monkeypatch.setenv("FINEWEB_MODAL_GPU", "Z9")
        with pytest.raises(ConfigError, match="no price for GPU 'Z9'"):
            importlib.reload(modal_app)
        # Priced by hand: deployable, and the price travels with the containers (they check the GPU again).
        monkeypatch.setenv("FINEWEB_MODAL_RATES", '{"Z9": 0.002}')
        assert importlib.reload(modal_app).IMAGE_ENV["FINEWEB_MODAL_RATES"] == '{"Z9": 0.002}'
    finally:
        for name in ("FINEWEB_MODAL_TEI_MODEL", "FINEWEB_MODAL_TEI_MAX_BATCH_TOKENS", "FINEWEB_MODAL_GPU", "FINEWEB_MODAL_RATES"):
            monkeypatch.delenv(name, raising=False)
        importlib.reload(modal_app)


def test_a_router_that_died_is_started_again_before_the_next_shard(modal_app, monkeypatch):
    """Through `.local()`, so `self` is the instance Modal builds (where the `@enter` method cannot be called again)."""
    import subprocess
    import sys

    routers: list[subprocess.Popen] = []
    start_process = subprocess.Popen  # `modal_app.subprocess` is this module: patched below

    def popen(command: list[str], **kwargs) -> subprocess.Popen:
        assert command[0] == "text-embeddings-router"
        # The first router dies at once (exit code 3); the one started after it stays up.
        script = "raise SystemExit(3)" if not routers else "import time; time.sleep(60)"
        routers.append(start_process([sys.executable, "-c", script]))
        routers[-1].wait(timeout=30) if len(routers) == 1 else None
        return routers[-1]

    monkeypatch.setattr(modal_app.subprocess, "Popen", popen)
    monkeypatch.setattr(modal_app, "wait_until_healthy", lambda url, timeout_s, process: None)
    monkeypatch.setattr(modal_app, "_run", lambda job, before: before() or job["run"]["embed"])  # inside _run: a failed restart is billed as the attempt
    embedder = modal_app.TEIEmbedder()
    try:
        url = f"http://127.0.0.1:{modal_app.TEI_PORT}"
        assert embedder.embed_shard.local({"run": {"embed": {}}}) == {"engine": "tei", "tei_url": url}
        assert [r.returncode for r in routers] == [3, None], "the dead router was replaced by a live one"
        embedder.embed_shard.local({"run": {"embed": {}}})
        assert len(routers) == 2, "a live router is not restarted"
    finally:
        for router in routers:
            router.kill()
