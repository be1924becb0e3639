"""Reading back what a flow run left in the Prefect API (task runs appear a moment after the flow returns)."""

from __future__ import annotations

import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterTaskRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)


def child_flow_run_ids(flow_run_id: UUID) -> list[UUID]:
    """The subflow runs (stages) of a pipeline run."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    return [r.id for r in runs]


def task_runs_of(flow_run_ids: list[UUID], expected: int, timeout: float = 30.0) -> list:
    """Task runs of these flow runs in a final state, polled until `expected` of them are there."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=flow_run_ids)), limit=200)
        final = [r for r in runs if r.state and r.state.is_final() and r.task_inputs is not None]
        if len(final) >= expected or time.monotonic() > deadline:
            return final
        time.sleep(0.3)


def latest_artifact(key: str):
    """The newest artifact with this key."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created) if found else None


def task_run_logs(task_run_id: UUID, containing: str, timeout: float = 30.0) -> list[str]:
    """A task run's log messages, polled until one contains `containing` (logs reach the API a moment late)."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            messages = [log.message for log in client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), limit=200)]
        if any(containing in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.3)
