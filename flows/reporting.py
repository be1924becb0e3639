"""The Prefect UI's view of a stage: a progress artifact while shards finish, then a table and a summary."""

from __future__ import annotations

from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from fineweb_modal.config import RunConfig
from fineweb_modal.report import StageReport, artifact_key, pipeline_resume, resume_command, shard_table, stage_markdown


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
    markdown = stage_markdown(report, resume_command(run, report.stage))
    create_markdown_artifact(
        markdown + ("\n\n" + extra_markdown if extra_markdown else ""),
        key=artifact_key(report.stage, report.name, "summary"),
        description=f"{report.stage} · {report.name}: totals",
    )


def publish_pipeline_stop(run: RunConfig, reports: dict[str, StageReport], message: str) -> None:
    """The pipeline run's own summary when it did not finish: why, each stage's counts, and the command that resumes the whole run."""
    lines = [f"# pipeline · {run.dataset.name}: not finished", "", message, "", "| stage | done | skipped | failed | not started |", "|---|---:|---:|---:|---:|"]
    for stage, report in reports.items():
        done = sum(r.status == "done" for r in report.results)
        lines.append(f"| {stage} | {done} | {len(report.results) - done} | {len(report.failed)} | {len(report.not_started)} |")
    if resume := pipeline_resume(run, reports):
        lines += ["", resume[0], "", f"```\n{resume[1]}\n```"]
    create_markdown_artifact("\n".join(lines), key=artifact_key("pipeline", run.dataset.name, "summary"), description=f"pipeline · {run.dataset.name}: how to resume")
