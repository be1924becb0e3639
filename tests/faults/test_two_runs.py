"""Two runs at once on one data dir: a lease per shard keeps them from working on the same shard."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from fineweb_modal.errors import ShardBusyError, is_transient
from fineweb_modal.ledger import Ledger, ShardLease, _pid_space
from fineweb_modal.shards import ShardJob, layout_for, run_shard, run_shard_exclusive


def modal_with(store, calls: dict | None = None):
    """Just the parts of `modal` the call bookkeeping uses: a Dict (the store), FunctionCall.from_id, a Volume."""

    class Modal:
        class Dict:
            @staticmethod
            def from_name(name, create_if_missing=False):
                return store

        class FunctionCall:
            @staticmethod
            def from_id(call_id):
                return (calls or {})[call_id]

        class Volume:
            @staticmethod
            def from_name(name, create_if_missing=False):
                return None

    return Modal


def test_a_second_owner_is_refused_with_who_holds_it(tmp_path):
    path = tmp_path / "chunk" / "s0.lease"
    with ShardLease(path, "flow-run A"):
        with pytest.raises(ShardBusyError, match=r"s0 is being worked on by flow-run A on .*rerun when it is done") as caught:
            ShardLease(path, "flow-run B").acquire()
        assert not is_transient(caught.value), "busy is not retried by Prefect: the other run finishes the shard"
    assert not path.exists(), "released on exit"
    with ShardLease(path, "flow-run B"):
        assert path.exists()


def test_the_same_owner_takes_its_own_lease_back(tmp_path):
    path = tmp_path / "s0.lease"
    ShardLease(path, "flow-run A").acquire()  # never released: the process running it died
    with ShardLease(path, "flow-run A") as again:
        assert again.token in path.read_text()


def test_an_expired_lease_is_broken_and_a_live_one_is_renewed(tmp_path):
    stale = tmp_path / "stale.lease"
    ShardLease(stale, "crashed run", ttl_s=0.2)._create()
    time.sleep(0.3)
    with ShardLease(stale, "next run", ttl_s=0.2) as lease:
        assert lease.token in stale.read_text()
        # Held past several TTLs: the heartbeat keeps renewing it, so a third run is still refused.
        time.sleep(0.6)
        with pytest.raises(ShardBusyError):
            ShardLease(stale, "third run", ttl_s=0.2).acquire()


def test_a_lease_whose_process_is_gone_is_broken_at_once(tmp_path):
    """A run killed with SIGKILL leaves its lease behind: on the same host a dead pid frees it without the TTL's wait."""
    import json
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "s0.lease"
    here = _pid_space()
    cases = [
        (socket.gethostname(), here, dead.pid, True),
        ("another-host", here, dead.pid, False),
        (socket.gethostname(), "4026531999@another-container", dead.pid, False),  # same hostname, other pids
        (socket.gethostname(), here, os.getpid(), False),  # alive
    ]
    for host, space, pid, taken in cases:
        path.write_text(json.dumps({"owner": "killed run", "token": "t", "host": host, "pid_space": space, "pid": pid}))
        if taken:
            with ShardLease(path, "next run", ttl_s=600) as lease:
                assert lease.token in path.read_text()
        else:  # another host's or namespace's process cannot be checked, and a live one holds its lease: they wait for the TTL
            with pytest.raises(ShardBusyError):
                ShardLease(path, "next run", ttl_s=600).acquire()
        path.unlink(missing_ok=True)


def test_release_never_removes_a_lease_that_was_taken_over(tmp_path):
    path = tmp_path / "s0.lease"
    first = ShardLease(path, "A", ttl_s=0.1)
    first.acquire()
    first._stop.set()  # its heartbeat stopped: it looks crashed
    time.sleep(0.2)
    second = ShardLease(path, "B", ttl_s=0.1)
    second.acquire()
    first.release()
    assert second.token in path.read_text(), "A's late release left B's lease alone"
    second.release()


def _race(run, shards: list[str], owner: str, start: multiprocessing.Event, results: multiprocessing.Queue) -> None:
    start.wait()
    for shard in shards:
        try:
            outcome = run_shard_exclusive(ShardJob(stage="chunk", shard=shard, run=run, owner=owner)).status
        except ShardBusyError:
            outcome = "busy"
        except Exception as exc:  # reported, not a silent timeout of the test's queue
            outcome = f"error {type(exc).__name__}: {exc}"
        results.put((owner, shard, outcome))


def test_two_runs_at_once_never_both_chunk_a_shard(demo_source, run_config_for, tmp_path):
    run = run_config_for(demo_source, backend="local")
    shards = [p.stem for p in sorted(demo_source.glob("*.parquet"))]
    for path in sorted(demo_source.glob("*.parquet")):
        run_shard(ShardJob(stage="download", shard=path.stem, run=run, source_file=str(path)))
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    runs = [ctx.Process(target=_race, args=(run, shards, owner, start, results)) for owner in ("run A", "run B")]
    for process in runs:
        process.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in range(2 * len(shards))]
    for process in runs:
        process.join(timeout=60)
    by_shard = {shard: sorted(o for _, s, o in outcomes if s == shard) for shard in shards}
    for shard, seen in by_shard.items():
        assert seen.count("done") == 1, f"{shard} was chunked once, not twice: {seen}"
        assert set(seen) <= {"done", "busy", "skipped"}
    ledger = Ledger(layout_for(run))
    for shard in shards:
        assert ledger.done_record("chunk", shard, ledger.read("chunk", shard).fingerprint) is not None, "outputs match their records"
    leases = list((tmp_path / "data").rglob("*.lease"))
    assert leases == [], "every lease was released"


def test_two_modal_runs_at_once_share_one_call(tmp_path, monkeypatch):
    """On Modal the lease is the call record in a modal.Dict, reserved with put(skip_if_exists=True)."""
    from tasks.backends import ModalBackend
    from tests.tasks.test_modal_backend import FakeCall, FakeDict

    calls, spawned = {}, []

    Modal = modal_with(FakeDict(), calls)

    backend = ModalBackend(modal_module=Modal)
    gate = threading.Event()

    def spawn():
        call = FakeCall(lambda: (gate.wait(10), {"answer": 42})[1], calls)
        spawned.append(call.object_id)
        return call

    answers = []
    first = threading.Thread(target=lambda: answers.append(backend._call("chunk/demo/s0", spawn)))
    first.start()
    while not spawned:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: answers.append(backend._call("chunk/demo/s0", spawn)))
    second.start()
    time.sleep(0.2)
    gate.set()
    first.join(10), second.join(10)
    assert len(spawned) == 1, "the second run waited on the first run's call instead of starting another"
    assert [a[0] for a in answers] == [{"answer": 42}] * 2 and Modal.Dict.from_name("x") == {}


def test_a_modal_reservation_that_never_started_a_call_expires(monkeypatch):
    from tasks import backends
    from tests.tasks.test_modal_backend import FakeCall, FakeDict

    monkeypatch.setattr(backends, "LEASE_TTL_S", 0.5)
    calls, store = {}, FakeDict()
    store.put("chunk/demo/s0", {"call_id": None, "reserved": "earlier", "reserved_at": time.time() - 1})

    Modal = modal_with(store)

    output, call_id = backends.ModalBackend(modal_module=Modal)._call("chunk/demo/s0", lambda: FakeCall(lambda: "ran", calls))
    assert output == "ran" and call_id in calls and store == {}


def test_a_run_that_lost_its_lease_records_nothing(demo_source, run_config_for):
    run = run_config_for(demo_source)
    path = sorted(demo_source.glob("*.parquet"))[0]
    run_shard(ShardJob(stage="download", shard=path.stem, run=run, source_file=str(path)))
    with pytest.raises(ShardBusyError, match="another run took over this shard's lease"):
        run_shard(ShardJob(stage="chunk", shard=path.stem, run=run), still_ours=lambda: False)
    assert Ledger(layout_for(run)).read("chunk", path.stem) is None, "the run that took over records the shard"


def test_the_modal_lease_is_the_output_files_and_its_config_ignores_which_shards_a_run_picked(demo_source, run_config_for):
    from tasks.backends import call_config, call_key

    job = ShardJob(stage="embed", shard="s0", run=run_config_for(demo_source))
    other_selection = ShardJob(stage="embed", shard="s0", run=run_config_for(demo_source, shards="s0,s1", only="failed", max_cost=3))
    other_model_config = ShardJob(stage="embed", shard="s0", run=run_config_for(demo_source, embedding_dtype="float16"))
    other_file = ShardJob(stage="embed", shard="s0", run=run_config_for(demo_source, max_tokens=128))
    assert call_key(job) == call_key(other_selection) == call_key(other_model_config) != call_key(other_file)
    assert call_key(job) == layout_for(job.run).lease_path("embed", "s0").relative_to(job.run.dataset.data_dir).as_posix()
    assert call_config(job) == call_config(other_selection) != call_config(other_model_config)


def test_two_modal_runs_with_other_configs_never_write_one_file_at_once(demo_source, run_config_for, monkeypatch):
    """Both would write the same embedding file (vectors of one, ledger record of the other): the second is refused as
    a local run would be (ShardBusyError), while the first's call runs; once it has ended, the second goes ahead."""
    from tasks.backends import ModalBackend, call_config, call_key
    from tests.tasks.test_modal_backend import FakeCall, FakeDict

    store, calls = FakeDict(), {}
    backend = ModalBackend(modal_module=modal_with(store, calls))
    first = ShardJob(stage="embed", shard="s0", run=run_config_for(demo_source))
    second = ShardJob(stage="embed", shard="s0", run=run_config_for(demo_source, embedding_dtype="float16"))

    class Running(FakeCall):
        def get(self, timeout=None):
            raise TimeoutError  # no result yet

    theirs = Running(lambda: None, calls)
    store.put(call_key(first), {"call_id": theirs.object_id, "config": call_config(first), "reserved": "t", "reserved_at": time.time(), "flow_run_id": "run-1"})
    with pytest.raises(ShardBusyError, match="writes this shard with another config"):
        backend._call(call_key(second), lambda: pytest.fail("a second call was spawned for the same file"), call_config(second))
    assert store[call_key(first)]["call_id"] == theirs.object_id, "the first run's record stays"

    class EndedWithItsOwnTimeout(FakeCall):
        def get(self, timeout=None):
            raise TimeoutError("read timed out")  # the call's own error: it has ended

    finished = EndedWithItsOwnTimeout(lambda: None, calls)
    store[call_key(first)] = {**store[call_key(first)], "call_id": finished.object_id}
    output, _ = backend._call(call_key(second), lambda: FakeCall(lambda: "ours", calls), call_config(second))
    assert output == "ours" and store == {}


def test_a_failed_spawn_frees_its_reservation_and_cancel_skips_reservations():
    from tasks.backends import ModalBackend
    from tests.tasks.test_modal_backend import FakeDict

    store = FakeDict()

    Modal = modal_with(store)

    backend = ModalBackend(modal_module=Modal)

    def broken_spawn():
        raise ConnectionError("Modal API unreachable")

    with pytest.raises(ConnectionError):
        backend._call("chunk/demo/s0", broken_spawn)
    assert store == {}, "the retry does not wait on a reservation that never started a call"

    store.put("chunk/demo/s1", {"call_id": None, "reserved_at": time.time(), "flow_run_id": "run-1"})
    assert backend.cancel_calls("run-1") == [] and store == {}, "a reservation is dropped, not cancelled as a call"
