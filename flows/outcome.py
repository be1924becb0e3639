"""Failed states that keep what a flow produced: Prefect wants an exception as a failed state's data."""

from __future__ import annotations

import re
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
    """A flow that could not start (a ConfigError): its message in the log and the state, not a traceback.

    Config errors name CLI flags (`--tei-url`); in a run a deployment started, whose user filled in a form,
    they name the parameters (`tei_url`) instead.
    """
    from prefect import get_run_logger

    message = for_this_run(str(error))
    get_run_logger().error("%s could not start: %s", what, message)
    return Failed(message=f"{what}: {message}", data=error)


def for_this_run(message: str) -> str:
    """A message naming CLI flags, with the flow's parameter names instead when a deployment started this run."""
    from prefect.runtime import deployment, flow_run

    return in_parameter_terms(message, set(flow_run.parameters)) if deployment.id else message


def in_parameter_terms(message: str, parameters: set[str]) -> str:
    """`--tei-url` → `` `tei_url` `` for each flag that is one of `parameters`; other text is left as it is."""

    def parameter(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        return f"`{name}`" if name in parameters else match.group(0)

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", parameter, message)


def outcome(state: State) -> Any:
    """What a finished flow or task produced: its result, the data a FlowFailed carries, or the exception it failed with."""
    result = state.result(raise_on_failure=False)
    return result.data if isinstance(result, FlowFailed) else result
