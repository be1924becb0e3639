"""Flow-run hooks: what happens to work on Modal when a flow run is cancelled."""

from __future__ import annotations

from prefect import get_run_logger

from tasks.backends import ModalBackend


def cancel_modal_calls(flow, flow_run, state) -> None:
    """On cancellation, cancel the Modal calls this run (or any run under it) started, so no GPU keeps billing."""
    if (flow_run.parameters or {}).get("backend") != "modal":
        return
    cancelled = ModalBackend().cancel_calls(str(flow_run.id))
    try:
        get_run_logger().info("cancelled %d Modal call(s): %s", len(cancelled), ", ".join(cancelled))
    except Exception:  # hooks may run outside a run context (in the runner); the cancellation is what matters
        pass
