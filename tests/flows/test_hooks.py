"""Cancelling a flow run on the modal backend cancels the Modal calls it started: no GPU keeps billing."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

from flows import hooks


def test_every_flow_that_starts_modal_calls_has_the_hook():
    from flows.chunk import chunk
    from flows.download import download
    from flows.embed import embed
    from flows.pipeline import pipeline
    from flows.summarize import summarize

    for flow in (pipeline, download, chunk, embed, summarize):
        assert hooks.cancel_modal_calls in flow.on_cancellation_hooks, flow.name


def test_the_hook_cancels_the_runs_modal_calls_and_leaves_local_runs_alone(monkeypatch):
    asked: list[str] = []

    class ModalBackendDouble:  # a test double: what the hook asks of the backend (cancel_calls has its own tests)
        def cancel_calls(self, flow_run_id: str) -> list[str]:
            asked.append(flow_run_id)
            return ["fc-1", "fc-2"]

    monkeypatch.setattr(hooks, "ModalBackend", ModalBackendDouble)
    modal_run = SimpleNamespace(id=uuid.uuid4(), parameters={"backend": "modal", "source": "x"})
    hooks.cancel_modal_calls(None, modal_run, None)  # outside a run context, as in a runner: no logger, no error
    assert asked == [str(modal_run.id)]
    hooks.cancel_modal_calls(None, SimpleNamespace(id=uuid.uuid4(), parameters={"backend": "local"}), None)
    hooks.cancel_modal_calls(None, SimpleNamespace(id=uuid.uuid4(), parameters=None), None)
    assert asked == [str(modal_run.id)], "local runs start no Modal call"
