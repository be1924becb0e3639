"""Failed states that keep what a flow produced: Prefect wants an exception as a failed state's data."""

from __future__ import annotations

from typing import Any

from prefect.states import Failed, State


class FlowFailed(Exception):
    """A flow's failure carrying what it produced (stage reports, verify rows), so a caller can still show it."""

    def __init__(self, message: str, data: Any = None):
        super().__init__(message)
        self.data = data

    def __reduce__(self):  # results are pickled: keep the data through it
        return (type(self), (str(self), self.data))


def failed(message: str, data: Any) -> State:
    """A Failed state whose data is a FlowFailed holding `data` (a runner or worker resolves it into an exception)."""
    return Failed(message=message, data=FlowFailed(message, data))


def refused(what: str, error: Exception) -> State:
    """A flow that could not start (a ConfigError): its message in the log and the state, not a traceback."""
    from prefect import get_run_logger

    get_run_logger().error("%s could not start: %s", what, error)
    return Failed(message=f"{what}: {error}", data=error)


def outcome(state: State) -> Any:
    """What a finished flow or task produced: its result, the data a FlowFailed carries, or the exception it failed with."""
    result = state.result(raise_on_failure=False)
    return result.data if isinstance(result, FlowFailed) else result
