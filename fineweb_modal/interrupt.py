"""A stop request for this process (Ctrl-C on `fineweb-modal run`), which shard work checks between steps.

Without it, a run told to stop would wait for every shard already handed to a task thread: Prefect lets
started tasks finish before it reports the crash, and a local run may have dozens queued. With it, a shard
not yet started ends at once, and an embed shard stops after its current piece, its written parts kept for
the rerun. Nothing sets it in a Modal container (a cancelled flow run cancels the Modal calls instead).
"""

from __future__ import annotations

import threading

from fineweb_modal.errors import Interrupted

_requested = threading.Event()


def request_stop() -> None:
    """Ask this process's shard work to stop as soon as it can."""
    _requested.set()


def withdraw_stop() -> None:
    """Forget a stop request, so that the next run in this process starts."""
    _requested.clear()


def stop_requested() -> bool:
    """Whether a stop was requested."""
    return _requested.is_set()


def stop_requested_within(seconds: float) -> bool:
    """Whether a stop is requested now or within `seconds` (for an event that may come just before the request)."""
    return _requested.wait(seconds)


def interrupted(what_happened: str) -> Interrupted:
    """The Interrupted error for `what_happened` on a Ctrl-C, with how to resume."""
    return Interrupted(f"{what_happened} (Ctrl-C); rerun the same command to resume")


def raise_if_stop_requested(what: str) -> None:
    """Raise Interrupted naming `what` when a stop was requested."""
    if _requested.is_set():
        raise interrupted(f"{what}: stopped on request before it finished")
