"""The Prefect UI's view of a stage: a progress artifact while shards finish, then a table and a summary."""

from __future__ import annotations

from collections import Counter
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from fineweb_modal.config import RunConfig
from fineweb_modal.costs import format_usd
from fineweb_modal.report import StageReport, artifact_key, group_digits, pipeline_resume, resume_command, shards_of, shard_table, stage_markdown
from tasks.backends import get_backend


class StageProgress:
    """A progress artifact that moves as shards finish."""

    def __init__(self, stage: str, name: str, total: int):
        self.total, self.finished = total, 0
        self.artifact_id: UUID = create_progress_artifact(
            0.0, key=artifact_key(stage, name, "progress"), description=f"{stage} {name}: shards finished of {total}"
        )

    def advance(self) -> None:
        """One more shard finished (done, skipped or failed)."""
        self.finished += 1
        update_progress_artifact(self.artifact_id, 100.0 * self.finished / max(self.total, 1), description=f"{self.finished}/{self.total} shards finished")


def publish_stage(report: StageReport, run: RunConfig, extra_markdown: str = "") -> None:
    """Write the per-shard table and the markdown summary of a finished stage."""
    create_table_artifact(
        shard_table(report),
        key=artifact_key(report.stage, report.name, "shards"),
        description=f"{report.stage} · {report.name}: one row per shard (tokens, seconds, $)",
    )
    markdown = stage_markdown(report, resume_command(run, report.stage, shards_of(run, report)))
    create_markdown_artifact(
        markdown + ("\n\n" + extra_markdown if extra_markdown else ""),
        key=artifact_key(report.stage, report.name, "summary"),
        description=f"{report.stage} · {report.name}: totals",
    )


def publish_pipeline_summary(run: RunConfig, reports: dict[str, StageReport], message: str, finished: bool) -> None:
    """The pipeline run's own summary, finished or not: this run's counts and $ per stage, every shard of the dataset
    per stage as the ledger says now (a run over some shards shows the whole), and how to resume when not finished."""
    title = "finished" if finished else "not finished"
    lines = [f"# pipeline · {run.dataset.name}: {title}", "", message, "", "## This run", ""]
    lines += ["| stage | done | skipped | failed | not started | tokens | cost $ |", "|---|---:|---:|---:|---:|---:|---:|"]
    for stage, report in reports.items():
        done, totals = sum(r.status == "done" for r in report.results), report.totals()
        lines.append(
            f"| {stage} | {done} | {len(report.results) - done} | {len(report.failed)} | {len(report.not_started)} | {group_digits(totals['tokens'])} | {format_usd(totals['cost_usd'])} |"
        )
    lines += ["", "## The dataset now", "", *_dataset_status(run)]
    if not finished and (resume := pipeline_resume(run, reports)):
        lines += ["", resume[0], "", f"```\n{resume[1]}\n```"]
        if (rerun := _prefect_rerun()) is not None:
            lines += ["", "Or from Prefect, with this run's parameters:", "", f"```\n{rerun}\n```"]
    create_markdown_artifact("\n".join(lines), key=artifact_key("pipeline", run.dataset.name, "summary"), description=f"pipeline · {run.dataset.name}: {title}")


def _dataset_status(run: RunConfig) -> list[str]:
    """Per stage, how many of the dataset's shards are done, failed, missing or stale (the ledger, through the backend)."""
    try:
        backend = get_backend(run.backend)
        shards = backend.list_shards(run, "download")
        counts = {stage: Counter(backend.shard_statuses(run, stage, shards).values()) for stage in run.stages} if shards else {}
    except Exception as exc:  # the summary must not turn a finished run into a crashed one
        return [f"(the ledger could not be read: {type(exc).__name__}: {exc})"]
    if not shards:
        return ["(no shard yet)"]
    lines = [f"{len(shards)} shard(s).", "", "| stage | done | failed | missing | stale |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {stage} | {c['done']} | {c['failed']} | {c['missing']} | {c['stale']} |" for stage, c in counts.items()]
    return lines


def _prefect_rerun() -> str | None:
    """`prefect flow-run retry <id>` for a run a deployment started (its worker runs it again); None otherwise."""
    from prefect.runtime import deployment, flow_run

    return f"prefect flow-run retry {flow_run.id}" if deployment.id else None
