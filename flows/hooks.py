"""Flow-run hooks: a run's name, and what happens to work on Modal when a flow run is cancelled."""

from __future__ import annotations

from prefect import get_run_logger

from fineweb_modal.config import default_name
from tasks.backends import ModalBackend


def dataset_run_name() -> str:
    """A stage or pipeline run's name: its dataset and backend (`fineweb-edu-demo-local`), `-only-failed` for such a rerun."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    try:
        name = params.get("name") or default_name(params["source"], params.get("subset"))
    except Exception:  # no name and no source yet: the run is refused as it starts; its name must not fail first
        name = "unnamed"
    return f"{name}-{params.get('backend', 'local')}" + ("-only-failed" if params.get("only") else "")


def cancel_modal_calls(flow, flow_run, state) -> None:
    """On cancellation, cancel the Modal calls this run (or any run under it) started, so no GPU keeps billing."""
    if (flow_run.parameters or {}).get("backend") != "modal":
        return
    cancelled = ModalBackend().cancel_calls(str(flow_run.id))
    try:
        get_run_logger().info("cancelled %d Modal call(s): %s", len(cancelled), ", ".join(cancelled))
    except Exception:  # hooks may run outside a run context (in the runner); the cancellation is what matters
        pass
