"""The modal backend's call bookkeeping, against a test double of the `modal` client (no Modal account here).

The double runs each "remote" call through the real Modal functions' `.local()` on a local data dir.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fineweb_modal.errors import is_transient
from fineweb_modal.ledger import Ledger
from fineweb_modal.shards import ShardJob, layout_for, run_shard
from tasks.backends import MODAL_DATA_DIR, ModalBackend, call_config, call_key, lost_modal_link

_ids = itertools.count()


class FakeCall:
    """A spawned call; while `wait_error` is set, waiting on it raises that (the call itself runs on)."""

    def __init__(self, run, registry, wait_error: BaseException | None = None):
        self.object_id, self._run, self.cancelled, self.wait_error = f"fc-{next(_ids)}", run, False, wait_error
        registry[self.object_id] = self

    def get(self, timeout=None):
        if self.wait_error is not None:
            raise self.wait_error
        if self.cancelled:
            raise RuntimeError("cancelled")
        return self._run()

    def cancel(self, terminate_containers=False):
        self.cancelled, self.terminated_containers = True, terminate_containers

    def get_dashboard_url(self):
        return f"https://modal.example/calls/{self.object_id}"


class FakeDict(dict):
    def put(self, key, value, *, skip_if_exists=False):
        if skip_if_exists and key in self:
            return False
        self[key] = value
        return True


class FakeModal:
    """Just enough of `modal` for ModalBackend: Function/Cls lookups, spawn, FunctionCall.from_id, Dict, Volume."""

    def __init__(self, data_dir):
        from deployments import modal_app

        self.app, self.data_dir, self.calls, self.spawned, self.dict = modal_app, data_dir, {}, [], FakeDict()
        self.remote_calls: list[str] = []
        self.wait_errors: list[BaseException] = []  # given, one each, to the next calls spawned
        fake = self

        class Function:
            @staticmethod
            def from_name(app_name, name):
                return fake._function(name)

        class FunctionCall:
            @staticmethod
            def from_id(call_id):
                return fake.calls[call_id]

        class Dict:
            @staticmethod
            def from_name(name, create_if_missing=False):
                return fake.dict

        class Volume:
            @staticmethod
            def from_name(name, create_if_missing=False):
                return None

        class Cls:
            @staticmethod
            def from_name(app_name, name):
                return lambda: type("Instance", (), {method: fake._function(f"{name}.{method}") for method in ("embed_shard",)})

        self.tei_url = ""  # the TEI a fake TEIEmbedder container is given (a test double's address)
        self.Function, self.FunctionCall, self.Dict, self.Volume, self.Cls = Function, FunctionCall, Dict, Volume, Cls

    def _local(self, name):
        """The deployed function `name` (or `Class.method`), run here."""
        if "." in name:
            cls, method = name.split(".")
            return getattr(getattr(self.app, cls)(tei_url=self.tei_url), method)
        return getattr(self.app, name)

    def _function(self, name):
        fake = self

        class Remote:
            @staticmethod
            def spawn(payload, *args):
                payload.get("run", payload)["dataset"]["data_dir"] = fake.data_dir  # the Volume is this local dir here
                wait_error = fake.wait_errors.pop(0) if fake.wait_errors else None
                call = FakeCall(lambda: fake._local(name).local(payload, *args), fake.calls, wait_error)
                fake.spawned.append(call.object_id)
                return call

            @staticmethod
            def remote(*args):
                if args and args[0] == MODAL_DATA_DIR:  # the Volume's mount point
                    args = (fake.data_dir, *args[1:])
                elif args:
                    run = args[0].get("run", args[0])  # a shard job, or a run config
                    run["dataset"]["data_dir"] = fake.data_dir
                fake.remote_calls.append(name)
                return fake._local(name).local(*args)

        return Remote


@pytest.fixture
def downloaded(demo_source, run_config_for, tmp_path):
    run = run_config_for(demo_source, backend="modal")
    path = sorted(demo_source.glob("*.parquet"))[0]
    run_shard(ShardJob(stage="download", shard=path.stem, run=run, source_file=str(path)))
    return run, path.stem, FakeModal(str(tmp_path / "data"))


def test_a_call_is_recorded_while_it_runs_and_forgotten_when_it_returns(downloaded):
    run, shard, fake = downloaded
    backend = ModalBackend(modal_module=fake)
    result = backend.run(ShardJob(stage="chunk", shard=shard, run=run))
    assert result.status == "done" and result.where == "modal" and result.cost_usd > 0
    assert result.extra["modal_call_id"] == fake.spawned[0] and fake.dict == {}


def test_a_rerun_asks_the_ledger_before_starting_a_gpu_container(downloaded):
    """An embed shard done earlier is answered by a CPU function reading the ledger: no GPU call is spawned."""
    run, shard, fake = downloaded
    backend = ModalBackend(modal_module=fake)
    backend.run(ShardJob(stage="chunk", shard=shard, run=run))
    first = backend.run(ShardJob(stage="embed", shard=shard, run=run))
    assert first.status == "done" and len(fake.spawned) == 2 and fake.remote_calls == ["done_result_fn"]
    again = backend.run(ShardJob(stage="embed", shard=shard, run=run))
    assert again.status == "skipped" and again.tokens == first.tokens and again.where == "modal"
    assert len(fake.spawned) == 2, "no embed call was spawned for a shard done earlier"

    # A call recorded by a run that died while it waited is re-attached to and forgotten, not skipped past:
    # its record would otherwise outlive the shard's output and answer a later run with a stale result.
    job = ShardJob(stage="embed", shard=shard, run=run)
    orphan = FakeCall(lambda: {**again.model_dump(mode="json"), "status": "done"}, fake.calls)
    fake.dict.put(call_key(job), {"call_id": orphan.object_id, "config": call_config(job), "reserved_at": 0.0, "started": "t"})
    assert backend.run(job).extra["modal_call_id"] == orphan.object_id and fake.dict == {}


def test_a_restarted_run_reattaches_instead_of_starting_again(downloaded):
    run, shard, fake = downloaded
    job = ShardJob(stage="chunk", shard=shard, run=run)
    backend = ModalBackend(modal_module=fake)
    with pytest.raises(KeyboardInterrupt):  # the worker dies while waiting
        backend._call(call_key(job), lambda: FakeCall(lambda: {}, fake.calls, wait_error=KeyboardInterrupt()), call_config(job))
    record = fake.dict[call_key(job)]
    orphan = fake.calls[record["call_id"]]
    orphan.wait_error, orphan._run = None, lambda: fake.app.chunk_shard.local(
        {**job.model_dump(mode="json"), "where": "modal"}
    )  # the call itself kept running on Modal
    result = backend.run(job)
    assert fake.spawned == [], "no second call was started"
    assert result.status == "done" and result.extra["modal_call_id"] == record["call_id"] and fake.dict == {}


def test_a_lost_link_to_modal_keeps_the_call_so_the_retry_reattaches(downloaded):
    """The client's own ConnectionError says nothing of the call, which may still run: no second call is paid for."""
    from modal.exception import ConnectionError as ModalConnectionError

    run, shard, fake = downloaded
    job = ShardJob(stage="chunk", shard=shard, run=run)
    backend = ModalBackend(modal_module=fake)
    fake.wait_errors = [ModalConnectionError("Deadline exceeded")]
    with pytest.raises(ModalConnectionError) as lost:
        backend.run(job)
    assert is_transient(lost.value), "Prefect retries the task"
    call = fake.calls[fake.dict[call_key(job)]["call_id"]]
    assert fake.spawned == [call.object_id]
    with pytest.raises(ModalConnectionError):  # the retry re-attaches, and the link fails again
        backend.run(job)
    assert fake.dict[call_key(job)]["call_id"] == call.object_id, "still recorded"
    call.wait_error = None  # the link is back
    result = backend.run(job)
    assert result.status == "done" and result.extra["modal_call_id"] == call.object_id
    assert fake.spawned == [call.object_id] and fake.dict == {}


def test_every_lost_link_to_modal_is_retried_and_a_calls_own_error_is_not_one():
    import modal.exception as modal_errors
    from modal._utils.grpc_utils import RetryTimeoutError

    for error in (modal_errors.ConnectionError("x"), modal_errors.ServiceError("x"), modal_errors.InternalError("x"), RetryTimeoutError("x")):
        assert lost_modal_link(error) and is_transient(error), type(error).__name__
    assert not lost_modal_link(ConnectionError("reset by the shard's own code"))  # re-raised from the call: it failed


def test_a_modal_link_error_inside_a_container_comes_back_as_the_calls_own_failure(downloaded, monkeypatch):
    """Raised by the call (e.g. a Volume commit that lost its link), it must not make the caller wait on a finished call."""
    import modal.exception as modal_errors

    from deployments import modal_app

    run, shard, _ = downloaded

    def losing_its_link(job, overhead_seconds=0.0):
        raise modal_errors.ConnectionError("volume commit: deadline exceeded")

    monkeypatch.setattr(modal_app, "run_shard", losing_its_link)
    job = ShardJob(stage="chunk", shard=shard, run=run, where="modal")
    with pytest.raises(ConnectionError, match="in the Modal container: ConnectionError: volume commit") as raised:
        modal_app.chunk_shard.local(job.model_dump(mode="json"))
    assert not lost_modal_link(raised.value) and is_transient(raised.value), "forgotten by the caller, and retried afresh"


def test_a_hub_download_is_one_recorded_call_too(downloaded, demo_source, folder_as_hub_repo):
    """download_hub is spawned and recorded like a shard's call: a retry after a lost link downloads nothing twice."""
    from modal.exception import ConnectionError as ModalConnectionError

    run, _, fake = downloaded
    hub_run = run.model_copy(update={"download": run.download.model_copy(update={"source": str(demo_source), "source_kind": "hub"})})
    backend = ModalBackend(modal_module=fake)
    fake.wait_errors = [ModalConnectionError("Deadline exceeded")]
    with pytest.raises(ModalConnectionError):
        backend.download_hub(hub_run)
    assert len(fake.spawned) == 1 and len(fake.dict) == 1
    fake.calls[fake.spawned[0]].wait_error = None
    results = backend.download_hub(hub_run)
    assert len(fake.spawned) == 1 and fake.dict == {}
    assert results and all(r.status == "done" for r in results)
    assert sum(r.docs for r in results) == sum(pq.read_metadata(p).num_rows for p in demo_source.glob("*.parquet"))


def test_a_failed_call_is_forgotten_so_the_retry_starts_afresh(downloaded):
    run, shard, fake = downloaded
    backend = ModalBackend(modal_module=fake)

    def failing():
        raise ConnectionError("container preempted")

    with pytest.raises(ConnectionError):
        backend._call("k", lambda: FakeCall(failing, fake.calls))
    assert fake.dict == {}


def test_cancelling_a_run_cancels_its_calls_only(downloaded):
    _, _, fake = downloaded
    backend = ModalBackend(modal_module=fake)
    mine = FakeCall(lambda: {}, fake.calls)
    child = FakeCall(lambda: {}, fake.calls)
    other = FakeCall(lambda: {}, fake.calls)
    fake.dict.put("a", {"call_id": mine.object_id, "flow_run_id": "run-1", "root_flow_run_id": "run-1", "started": "t"})
    fake.dict.put("b", {"call_id": child.object_id, "flow_run_id": "sub-7", "root_flow_run_id": "run-1", "started": "t"})
    fake.dict.put("c", {"call_id": other.object_id, "flow_run_id": "run-2", "root_flow_run_id": "run-2", "started": "t"})
    assert sorted(backend.cancel_calls("run-1")) == sorted([mine.object_id, child.object_id])
    assert mine.cancelled and child.cancelled and not other.cancelled and list(fake.dict) == ["c"]
    assert mine.terminated_containers and child.terminated_containers, "a cancelled call's GPU container must not idle, billed"


def test_costs_use_the_workspaces_live_rates_when_readable(downloaded, monkeypatch):
    import time

    from deployments import modal_app
    from fineweb_modal.costs import ContainerClock, Resources, cost_usd

    run, shard, fake = downloaded
    # As in a container that started 30 s before the call: the shard pays for that time too.
    monkeypatch.setattr(modal_app.modal, "is_local", lambda: False)
    monkeypatch.setattr(modal_app, "volume", type("VolumeDouble", (), {"reload": lambda self: None, "commit": lambda self: None})())
    monkeypatch.setattr(modal_app, "container_clock", ContainerClock(started=time.monotonic() - 30.0))

    class Workspace:
        @staticmethod
        def from_context():
            class Billing:
                @staticmethod
                def rates():
                    return {"cpu": "0.00002", "memory": "0.000003", "gpu.h100": "0.0009"}

            return type("W", (), {"billing": Billing})()

    fake.Workspace = Workspace
    backend = ModalBackend(modal_module=fake)
    assert backend.rates == {"cpu_core": 0.00002, "memory_gib": 0.000003, "H100": 0.0009}
    result = backend.run(ShardJob(stage="chunk", shard=shard, run=run))
    assert 30.0 <= result.overhead_seconds < 60.0
    expected = cost_usd(result.seconds + result.overhead_seconds, Resources(cpu=result.cpu, memory_gib=result.memory_gib), {"cpu_core": 0.00002, "memory_gib": 0.000003})
    assert result.cost_usd == pytest.approx(expected, rel=1e-3) and result.extra["rates"] == "modal billing API"  # seconds are rounded to ms
    recorded = Ledger(layout_for(run)).read("chunk", shard).stats["cost_usd"]
    assert recorded == result.cost_usd, "status, publish's card and the ledger show the cost the run reported"

    del fake.Workspace  # no billing access: the dated table stands
    assert ModalBackend(modal_module=fake).rates == {}


def test_ctrl_c_cancels_the_call_being_waited_on(downloaded, monkeypatch):
    """A stopped run must not leave its GPU containers billing: the waiting task cancels its call and ends."""
    import threading
    import time

    from fineweb_modal.errors import Interrupted
    from fineweb_modal.interrupt import request_stop, withdraw_stop
    from tasks import backends

    monkeypatch.setattr(backends, "MODAL_POLL_S", 0.2)
    _, _, fake = downloaded

    class RunningCall(FakeCall):  # runs until cancelled: every wait on it times out after its whole slice
        def get(self, timeout=None):
            time.sleep(timeout)
            raise TimeoutError

    backend = ModalBackend(modal_module=fake)
    outcome: dict = {}

    def wait() -> None:
        try:
            backend._call("demo/train/embed/s0/abc", lambda: RunningCall(lambda: None, fake.calls))
        except Exception as exc:  # recorded, to assert on
            outcome["error"] = exc

    waiting = threading.Thread(target=wait)
    waiting.start()
    deadline = time.monotonic() + 30
    while not (fake.dict.get("demo/train/embed/s0/abc") or {}).get("call_id"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # a few slices
    assert waiting.is_alive(), "slices come and go while the call runs"
    request_stop()
    try:
        waiting.join(timeout=10)
    finally:
        withdraw_stop()
    (call,) = fake.calls.values()
    assert isinstance(outcome["error"], Interrupted) and call.cancelled and call.terminated_containers
    assert fake.dict == {}, "a cancelled call is not re-attached to"


def test_a_calls_own_timeout_error_is_its_result_not_a_slice_of_waiting(downloaded, monkeypatch):
    from tasks import backends

    monkeypatch.setattr(backends, "MODAL_POLL_S", 10.0)
    _, _, fake = downloaded

    class TimedOutCall(FakeCall):  # the shard's code raised TimeoutError: the result comes back at once
        def get(self, timeout=None):
            raise TimeoutError("the shard's own timeout")

    backend = ModalBackend(modal_module=fake)
    with pytest.raises(TimeoutError, match="the shard's own"):
        backend._call("demo/train/chunk/s0/abc", lambda: TimedOutCall(lambda: None, fake.calls))
    assert fake.dict == {}, "a failed call is forgotten: the retry spawns a new one"


def test_ctrl_c_leaves_another_runs_call_running(downloaded, monkeypatch):
    """Waiting on a call another run started for the same shard: this run stops, that one's call runs on."""
    import threading
    import time

    from fineweb_modal.errors import Interrupted
    from fineweb_modal.interrupt import request_stop, withdraw_stop
    from tasks import backends

    monkeypatch.setattr(backends, "MODAL_POLL_S", 0.2)
    _, _, fake = downloaded

    class RunningCall(FakeCall):
        def get(self, timeout=None):
            time.sleep(timeout)
            raise TimeoutError

    theirs = RunningCall(lambda: None, fake.calls)
    record = {"call_id": theirs.object_id, "flow_run_id": "their-run", "root_flow_run_id": "their-run", "reserved_at": time.time()}
    fake.dict["demo/train/embed/s0/abc"] = record
    backend = ModalBackend(modal_module=fake)
    outcome: dict = {}

    def wait() -> None:
        try:
            backend._call("demo/train/embed/s0/abc", lambda: pytest.fail("a second call was spawned"))
        except Exception as exc:  # recorded, to assert on
            outcome["error"] = exc

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.5)
    request_stop()
    try:
        waiting.join(timeout=10)
    finally:
        withdraw_stop()
    assert isinstance(outcome["error"], Interrupted) and "another run's Modal call" in str(outcome["error"])
    assert not theirs.cancelled and fake.dict["demo/train/embed/s0/abc"] == record


def test_a_model_the_deployed_tei_does_not_serve_is_refused_before_any_gpu_starts(downloaded, monkeypatch):
    """Else each embed shard would start a GPU container, wait for TEI to load its model, and only then fail."""
    from deployments import modal_app
    from fineweb_modal.errors import ConfigError
    from flows.stage import check_tei
    from tasks import backends

    run, _, fake = downloaded
    backend = ModalBackend(modal_module=fake)
    monkeypatch.setitem(backends._backends, "modal", backend)
    assert backend.deployed_settings() == {"gpu": modal_app.GPU, "tei_model": modal_app.TEI_MODEL, "tei_version": modal_app.TEI_VERSION, "code": backends.code_version()}
    tei_run = run.model_copy(update={"embed": run.embed.model_copy(update={"engine": "tei"})})
    with pytest.raises(ConfigError, match=f"the deployed Modal app's TEI serves {modal_app.TEI_MODEL}, not --model {run.embed.model}"):
        check_tei(tei_run)
    served = tei_run.model_copy(update={"embed": tei_run.embed.model_copy(update={"model": modal_app.TEI_MODEL})})
    check_tei(served)  # the deployed model: no complaint
    assert fake.spawned == [], "no shard call was made"

    class Missing(Exception):
        pass

    Missing.__name__ = "NotFoundError"  # what modal raises for a function the deployed app lacks
    monkeypatch.setattr(fake, "_function", lambda name: type("F", (), {"remote": staticmethod(lambda *a: (_ for _ in ()).throw(Missing("no such function")))}))
    with pytest.raises(ConfigError, match="not deployed, or is older than this code"):
        ModalBackend(modal_module=fake).deployed_settings()
    with pytest.raises(ConfigError, match="not deployed, or is older than this code"):
        backend.ledger_status("./data", None)  # `status --backend modal` against an app deployed before it existed
    with pytest.raises(ConfigError, match="not deployed, or is older than this code"):
        backend.list_shards(run, "chunk")  # `plan`, `verify`, `fetch --backend modal` before a deploy


def test_an_app_deployed_from_other_code_is_refused_before_any_shard_and_a_redeploy_is_seen(downloaded, monkeypatch):
    """The deployed app says which code it runs (its containers hash their own copies); a run of other code stops."""
    from deployments import modal_app
    from fineweb_modal.errors import ConfigError
    from flows.stage import check_before_work
    from tasks import backends

    run, _, fake = downloaded
    backend = ModalBackend(modal_module=fake)
    monkeypatch.setitem(backends._backends, "modal", backend)
    check_before_work(run)  # deployed from this checkout: passes
    assert fake.remote_calls.count("deployed_settings") == 1
    check_before_work(run)
    assert fake.remote_calls.count("deployed_settings") == 1, "one answer serves a run's checks"
    monkeypatch.setattr(backends, "DEPLOYED_SETTINGS_TTL_S", 0.0)
    check_before_work(run)
    assert fake.remote_calls.count("deployed_settings") == 2, "a worker serving for days asks again"

    monkeypatch.setattr(modal_app, "CODE_VERSION", "0123456789abcdef")  # as if deployed before a `git pull`
    stale = ModalBackend(modal_module=fake)
    monkeypatch.setitem(backends._backends, "modal", stale)
    message = f"the deployed Modal app 'fineweb-modal' runs other code than this checkout (deployed 0123456789abcdef, here {backends.code_version()}, the code in {Path(__file__).parents[2]}): redeploy it from there with `modal deploy deployments/modal_app.py` (it was deployed for GPU {modal_app.GPU}: keep FINEWEB_MODAL_GPU={modal_app.GPU}"
    with pytest.raises(ConfigError) as refused:
        check_before_work(run)
    assert str(refused.value).startswith(message)
    monkeypatch.setattr(modal_app, "deployed_settings", type("Older", (), {"local": staticmethod(lambda: {"gpu": "H100", "tei_model": "m", "tei_version": "1.9"})}))
    with pytest.raises(ConfigError, match=r"\(deployed before code versions, here [0-9a-f]{16}, the code in "):
        stale.check_deployment()
    monkeypatch.undo()  # redeployed from this checkout
    monkeypatch.setitem(backends._backends, "modal", stale)
    stale.check_deployment()  # asked again, and passes
    assert fake.spawned == [], "no shard call was made"


@pytest.mark.parametrize(
    ("module", "name", "said"),
    [
        ("grpclib.exceptions", "StreamTerminatedError", "cannot reach Modal (StreamTerminatedError: link down): check the network"),
        ("modal.exception", "ConnectionError", "cannot reach Modal (ConnectionError: link down): check the network"),
        ("modal.exception", "InternalError", "Modal could not answer just now (InternalError: link down): rerun in a minute"),
        ("builtins", "ConnectionRefusedError", "cannot reach Modal (ConnectionRefusedError: link down): check the network"),
        ("modal.exception", "AuthError", "Modal refused the token (link down): run `modal token new`"),
    ],
)
def test_a_modal_that_cannot_be_reached_or_refuses_the_token_is_one_line_before_any_shard(downloaded, monkeypatch, tmp_path, capsys, module, name, said):
    """A run's first call says so in one line; so do `status`, `plan`, `verify` and `fetch --backend modal` (exit 2 on the CLI)."""
    from fineweb_modal.errors import ConfigError
    from tasks import backends

    run, shard, fake = downloaded
    base = ConnectionRefusedError if name == "ConnectionRefusedError" else Exception
    error = type(name, (base,), {"__module__": module})("link down")  # what modal's client raises, by module and name
    monkeypatch.setattr(fake, "_function", lambda name: type("F", (), {"remote": staticmethod(lambda *a: (_ for _ in ()).throw(error))}))
    backend = ModalBackend(modal_module=fake)
    backend._volume = type("Volume", (), {"read_file": lambda self, path: (_ for _ in ()).throw(error)})()
    destination = tmp_path / "fetched" / "shard.parquet"
    for first_call in (
        backend.check_deployment,
        lambda: backend.ledger_status("./data", None),
        lambda: backend.list_shards(run, "chunk"),
        lambda: backend.fetch(run, "chunk", shard, destination),
    ):
        with pytest.raises(ConfigError) as refused:
            first_call()
        assert str(refused.value).startswith(said)
    assert list(destination.parent.iterdir()) == [], "no half-fetched file is left"
    for in_a_task in (lambda: backend._remote("done_result_fn", {}, in_flight=True), lambda: backend.verify(run, shard), lambda: backend.plan_sample(run, shard)):
        with pytest.raises(type(error)):
            in_a_task()  # a call in a task: the error as it is, for the task's retries

    from flows.stage import without_input

    monkeypatch.setitem(backends._backends, "modal", backend)
    with pytest.raises(ConfigError) as refused:
        without_input(run, "chunk", [shard])  # not read as "nothing reached this stage", which a ConfigError from a listing means
    assert str(refused.value).startswith(said)

    from flows.cli import main

    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    assert main(["status", "--backend", "modal"]) == 2, "not 1, which says the data has problems"
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {said}") and "Traceback" not in captured.out + captured.err
    assert main(["fetch", "--backend", "modal", "--name", run.dataset.name, "--max-tokens", "64", "--stage", "chunk", "--shard", shard, "--to", str(destination)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {said}") and "Traceback" not in captured.out + captured.err
    assert list(destination.parent.iterdir()) == []


def test_the_cli_refuses_a_modal_run_on_an_app_deployed_from_other_code_with_exit_2(prefect_api, downloaded, monkeypatch, capsys):
    from deployments import modal_app
    from flows.cli import main
    from tasks import backends

    run, _, fake = downloaded
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    monkeypatch.setattr(modal_app, "CODE_VERSION", "0123456789abcdef")  # as if deployed before a `git pull`
    monkeypatch.setitem(backends._backends, "modal", ModalBackend(modal_module=fake))
    argv = ["run", "--name", run.dataset.name, "--data-dir", str(run.dataset.data_dir), "--max-tokens", "64", "--stages", "chunk", "--backend", "modal"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "runs other code than this checkout (deployed 0123456789abcdef" in captured.err and "Traceback" not in captured.out + captured.err
    assert fake.spawned == [], "no shard call was made"
    # `status` still answers, from the deployed code's ledger reader, saying that it is the older code's view.
    assert main(["status", "--backend", "modal", "--name", run.dataset.name]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: the deployed Modal app 'fineweb-modal' runs other code than this checkout (deployed 0123456789abcdef")
    assert captured.err.rstrip().endswith("until then this status is the deployed code's view")
    assert f"{run.dataset.name}" in captured.out and "download" in captured.out
    assert main(["status", "--backend", "modal", "--name", run.dataset.name, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["dataset"] == run.dataset.name and captured.err.startswith("warning: "), "stdout stays JSON"
    assert main(["verify", "--backend", "modal", "--name", run.dataset.name, "--max-tokens", "64"]) == 1, "nothing embedded yet"
    assert "runs other code than this checkout (deployed 0123456789abcdef" in capsys.readouterr().err, "verify warns too"

    # An app deployed before it could say which code it runs: said too, and status answers all the same.
    class Missing(Exception):
        pass

    Missing.__name__ = "NotFoundError"  # what modal raises for a function the deployed app lacks
    answers = fake._function

    def older_app(name):
        if name == "deployed_settings":
            return type("F", (), {"remote": staticmethod(lambda *a: (_ for _ in ()).throw(Missing("no such function")))})
        return answers(name)

    monkeypatch.setattr(fake, "_function", older_app)
    monkeypatch.setitem(backends._backends, "modal", ModalBackend(modal_module=fake))
    assert main(["status", "--backend", "modal", "--name", run.dataset.name]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: cannot tell which code the deployed Modal app runs (the Modal app 'fineweb-modal' is not deployed, or is older")
    assert run.dataset.name in captured.out


def test_the_code_version_follows_the_app_file_and_the_packages(tmp_path, monkeypatch):
    import shutil

    import fineweb_modal
    from tasks.backends import code_version

    here = code_version()
    copy = tmp_path / "fineweb_modal"
    shutil.copytree(Path(fineweb_modal.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fineweb_modal, "__file__", str(copy / "__init__.py"))  # the package as a container would find it
    assert code_version() == here, "the same files, wherever they are"
    (copy / "chunking.py").write_text((copy / "chunking.py").read_text() + "\n# an edit since the deploy\n")
    assert code_version() != here, "a package file edited"
    monkeypatch.undo()

    app_file = tmp_path / "modal_app.py"
    app_file.write_text("GPU = 'H100'\n")
    before = code_version(app_file)
    assert before == code_version(app_file) and len(before) == 16
    app_file.write_text("GPU = 'A10G'\n")
    assert code_version(app_file) != before
    from deployments import modal_app

    assert code_version() == modal_app.CODE_VERSION, "this checkout's app file by default, as a container computes it from its own"


def test_a_missing_text_column_on_the_volume_is_refused_before_any_chunk_container(downloaded, run_config_for, demo_source, monkeypatch):
    from fineweb_modal.errors import ConfigError
    from flows.stage import _shards_and_inputs
    from tasks import backends

    run, shard, fake = downloaded
    monkeypatch.setitem(backends._backends, "modal", ModalBackend(modal_module=fake))
    assert list(_shards_and_inputs("chunk", run)) == [shard]
    wrong = run_config_for(demo_source, backend="modal", text_column="body")
    with pytest.raises(ConfigError, match=r"column\(s\) \['body'\] not found; the shard has \[.*'text'.*set --text-column"):
        _shards_and_inputs("chunk", wrong)
    assert fake.spawned == [] and fake.remote_calls.count("chunk_input_schema_fn") == 2, "one small CPU call each, no shard call"


def test_the_embed_flow_on_modal_with_tei_refuses_another_model_then_embeds_with_the_deployed_one(prefect_api, downloaded, monkeypatch):
    """The whole stage, as a deployment runs it: the deployed model is read first, then each shard goes to a TEIEmbedder."""
    from deployments import modal_app
    from flows.embed import embed
    from tasks import backends
    from tests.tei_double import TEITestDouble

    run, shard, fake = downloaded
    run_shard(ShardJob(stage="chunk", shard=shard, run=run))
    monkeypatch.setitem(backends._backends, "modal", ModalBackend(modal_module=fake))
    params = dict(name=run.dataset.name, data_dir=fake.data_dir, backend="modal", engine="tei", max_tokens=64, return_state=True)
    state = embed(**params)
    assert state.is_failed() and "the deployed Modal app's TEI serves nomic-ai/nomic-embed-text-v1.5, not --model" in state.message
    assert fake.spawned == [], "no GPU container was started to find out"

    monkeypatch.setattr(modal_app, "TEI_MODEL", run.embed.model)  # deployed with the run's model
    double = TEITestDouble().start()
    try:
        fake.tei_url = double.url
        state = embed(**params)
    finally:
        double.stop()
    assert state.is_completed(), state.message
    (result,) = state.result().results
    assert result.status == "done" and result.chunks == double.metrics.embedded_inputs > 0 and len(fake.spawned) == 1


def test_a_failed_attempt_carries_what_its_container_was_billed_and_the_next_shard_does_not_pay_it_again(downloaded, run_config_for, demo_source, monkeypatch):
    """--max-cost counts failed attempts: the container puts its billed time on the error (30 s before the call included)."""
    import time

    from deployments import modal_app
    from fineweb_modal.costs import ContainerClock, billed_on, rate_per_second, stage_resources

    run, shard, fake = downloaded
    monkeypatch.setattr(modal_app.modal, "is_local", lambda: False)
    monkeypatch.setattr(modal_app, "volume", type("VolumeDouble", (), {"reload": lambda self: None, "commit": lambda self: None})())
    monkeypatch.setattr(modal_app, "container_clock", ContainerClock(started=time.monotonic() - 30.0))
    backend = ModalBackend(modal_module=fake)
    wrong = run_config_for(demo_source, backend="modal", text_column="body")
    with pytest.raises(Exception) as raised:
        backend.run(ShardJob(stage="chunk", shard=shard, run=wrong))
    billed = billed_on(raised.value)
    rate = rate_per_second(stage_resources("chunk"))
    assert billed is not None and 30 * rate <= billed < 60 * rate
    assert any("this attempt was billed" in note and "as the container measured it" in note for note in raised.value.__notes__)
    result = backend.run(ShardJob(stage="chunk", shard=shard, run=run))
    assert result.status == "done" and result.overhead_seconds < 30.0, "the failure paid for the container's start already"


def test_a_container_that_died_without_a_word_is_billed_the_whole_wait(downloaded):
    """Killed out of memory or at its timeout, a container says nothing: the caller counts its wait as billed, at most."""
    from fineweb_modal.costs import billed_on

    run, shard, fake = downloaded
    backend = ModalBackend(modal_module=fake)
    fake.wait_errors = [RuntimeError("container exited with code 137 (out of memory)")]
    with pytest.raises(RuntimeError) as raised:
        backend.run(ShardJob(stage="chunk", shard=shard, run=run))
    assert billed_on(raised.value) is not None and billed_on(raised.value) > 0
    assert any("its call's whole life" in note for note in raised.value.__notes__)
    assert fake.dict == {}, "a failed call is forgotten: the retry starts afresh"


def test_a_reattached_call_that_failed_is_counted_with_the_call_that_replaced_it(downloaded):
    """A retry after a lost link re-attaches to its own call; when that call failed (billed $2), the new one's result says so."""
    from fineweb_modal.costs import mark_billed

    run, shard, fake = downloaded
    job = ShardJob(stage="chunk", shard=shard, run=run)
    backend = ModalBackend(modal_module=fake)
    failure = RuntimeError("container exited with code 1")
    mark_billed(failure, 2.0, "as the container measured it")
    earlier = FakeCall(lambda: None, fake.calls, wait_error=failure)
    fake.dict.put(call_key(job), {"call_id": earlier.object_id, "config": call_config(job), "reserved_at": 0.0, "flow_run_id": "", "root_flow_run_id": ""})
    result = backend.run(job)
    assert result.status == "done" and result.extra["modal_call_id"] != earlier.object_id
    assert result.extra["failed_attempts_usd"] == 2.0


def test_what_never_ran_in_a_container_is_not_billed(downloaded):
    """A refusal (another run writes the file) or a call that could not be spawned cost nothing: no bill on the error."""
    import time

    from fineweb_modal.costs import billed_on
    from fineweb_modal.errors import ShardBusyError

    run, shard, fake = downloaded
    job = ShardJob(stage="chunk", shard=shard, run=run)
    backend = ModalBackend(modal_module=fake)

    class Running(FakeCall):
        def get(self, timeout=None):
            raise TimeoutError  # no result yet

    theirs = Running(lambda: None, fake.calls)
    fake.dict.put(call_key(job), {"call_id": theirs.object_id, "config": "another-config", "reserved": "t", "reserved_at": time.time()})
    with pytest.raises(ShardBusyError) as busy:
        backend.run(job)
    assert billed_on(busy.value) is None

    fake.dict.clear()
    unspawnable = ConnectionRefusedError("app not deployed")

    def failing_spawn(payload, *args):
        raise unspawnable

    original = fake._function
    fake._function = lambda name: type("Remote", (), {"spawn": staticmethod(failing_spawn), "remote": original(name).remote})
    with pytest.raises(ConnectionRefusedError):
        backend.run(job)
    assert billed_on(unspawnable) is None and fake.dict == {}


def test_status_reads_the_ledger_on_the_volume(downloaded, monkeypatch, capsys):
    """`fineweb-modal status --backend modal`: what a Modal user's shards are, without a copy of the Volume here."""
    from fineweb_modal.status import ledger_status
    from flows.cli import main
    from tasks import backends

    run, shard, fake = downloaded
    backend = ModalBackend(modal_module=fake)
    backend.run(ShardJob(stage="chunk", shard=shard, run=run))
    on_the_volume = backend.ledger_status("./data", None)
    assert [s.as_dict() for s in on_the_volume] == [s.as_dict() for s in ledger_status(fake.data_dir)]
    assert {(s.stage, tuple(s.done)) for s in on_the_volume} == {("download", (shard,)), ("chunk", (shard,))} and fake.remote_calls[-1] == "ledger_status_fn"

    monkeypatch.setitem(backends._backends, "modal", backend)
    assert main(["status", "--backend", "modal", "--data-dir", "/no/such/dir"]) == 0, "every shard the Volume has is done"
    out = capsys.readouterr().out
    assert "demo-chunked-64" in out and " chunk " in out and " download " in out
    assert main(["status", "--backend", "modal", "--name", "nope"]) == 1
    assert "no ledger records under the Modal Volume (/data) for nope" in capsys.readouterr().out
