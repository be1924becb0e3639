"""Words and tables for people: state messages, the per-shard table, the stage summary. No Prefect here."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fineweb_modal.config import RunConfig
from fineweb_modal.costs import PRICE_TABLE_DATE, format_usd
from fineweb_modal.shards import ShardResult


class StageReport(BaseModel):
    """The outcome of one stage over its shards."""

    stage: str
    name: str
    backend: str
    results: list[ShardResult] = []
    failed: dict[str, str] = {}
    not_started: list[str] = []  # shards left out to stay within --max-cost
    # What each shard's failed attempts were billed (Modal), whether it failed in the end or a retry passed.
    failed_attempts_usd: dict[str, float] = {}
    extra: dict[str, Any] = {}

    @property
    def succeeded(self) -> list[str]:
        """Shards done now or earlier, in order."""
        return [r.shard for r in self.results]

    def totals(self) -> dict[str, float]:
        """Sums over the shards that ran or were skipped; the cost includes what failed attempts were billed."""
        keys = ("docs", "empty_docs", "chunks", "tokens", "seconds", "overhead_seconds", "cost_usd", "modal_estimate_usd")
        totals: dict[str, float] = {k: sum(getattr(r, k) for r in self.results) for k in keys}
        totals["failed_attempts_usd"] = sum(self.failed_attempts_usd.values())
        totals["cost_usd"] += totals["failed_attempts_usd"]  # billed all the same
        worked = [r for r in self.results if r.status == "done"]
        work_seconds = sum(r.seconds for r in worked)
        totals["tokens_per_second"] = sum(r.tokens for r in worked) / work_seconds if work_seconds else 0.0
        return totals

    def amount(self) -> str:
        """What the stage went through: `200 docs` for download (it counts no tokens), else `112 402 tokens`."""
        totals = self.totals()
        return f"{group_digits(totals['docs'])} docs" if self.stage == "download" else f"{group_digits(totals['tokens'])} tokens"


def group_digits(value: int | float) -> str:
    """`1234567` → `1 234 567` (thin groups read well in tables and state messages)."""
    return f"{int(value):,}".replace(",", " ")


def state_message(result: ShardResult) -> str:
    """A task run's state message: `1 234 567 tokens, $0.012` (docs for download) or `skipped: done earlier (…)`."""
    amount = f"{group_digits(result.docs)} docs" if result.stage == "download" else f"{group_digits(result.tokens)} tokens"
    if result.stage == "download" and result.rows_in > result.rows_out:
        amount += f" ({group_digits(result.rows_in - result.rows_out)} line(s) left out)"
    if result.status == "skipped":
        return f"skipped: done earlier ({amount})"
    cost = format_usd(result.cost_usd) if result.where == "modal" else f"$0 local (≈{format_usd(result.modal_estimate_usd)} on Modal)"
    if wasted := result.extra.get("failed_attempts_usd"):
        cost += f" (+{format_usd(wasted)} billed for failed attempts)"
    return f"{amount}, {cost}"


def artifact_key(stage: str, name: str, kind: str) -> str:
    """A valid, stable artifact key: the lower-case slug of `<stage>-<name>-<kind>`."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{stage}-{name}-{kind}".lower())).strip("-")


def shard_table(report: StageReport) -> list[dict[str, Any]]:
    """One row per shard: status, docs, chunks, tokens, seconds (work, container overhead), tokens/s, $ (its failed attempts' apart; the error of a failed one)."""
    rows = [
        {
            "shard": r.shard,
            "status": r.status,
            "docs": r.docs,
            "chunks": r.chunks,
            "tokens": r.tokens,
            "seconds": round(r.seconds, 2),
            "overhead s": round(r.overhead_seconds, 2),
            "tokens/s": round(r.tokens_per_second),
            "cost $": round(r.cost_usd, 6),
            "failed attempts $": round(report.failed_attempts_usd.get(r.shard, 0.0), 6),
            "modal estimate $": round(r.modal_estimate_usd, 6),
            "error": "",
        }
        for r in report.results
    ]
    rows += [
        {
            "shard": s,
            "status": "failed",
            **dict.fromkeys(("docs", "chunks", "tokens", "seconds", "overhead s", "tokens/s", "cost $"), 0),
            "failed attempts $": round(report.failed_attempts_usd.get(s, 0.0), 6),
            "modal estimate $": 0,
            "error": e[:300],
        }
        for s, e in report.failed.items()
    ]
    return sorted(rows, key=lambda row: row["shard"])


def stage_markdown(report: StageReport, resume_command: str) -> str:
    """The stage's summary: totals, throughput, dollars, slowest shards, failures and how to resume."""
    t = report.totals()
    skipped = sum(r.status == "skipped" for r in report.results)
    lines = [
        f"# {report.stage}: {report.name}",
        "",
        f"**{len(report.results)} of {len(report.results) + len(report.failed)} shards succeeded** "
        f"({skipped} skipped: done earlier), {len(report.failed)} failed · backend `{report.backend}`",
        "",
        "| docs | empty docs | chunks | tokens | work seconds | tokens/s | cost | Modal estimate |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {group_digits(t['docs'])} | {group_digits(t['empty_docs'])} | {group_digits(t['chunks'])} | {group_digits(t['tokens'])} "
        f"| {t['seconds']:.1f} | {group_digits(t['tokens_per_second'])} | {format_usd(t['cost_usd'])} | {format_usd(t['modal_estimate_usd'])} |",
        "",
        f"Costs use Modal's published per-second rates ({PRICE_TABLE_DATE}; override with FINEWEB_MODAL_RATES); the local backend costs $0 and shows what Modal would charge.",
    ]
    if t["overhead_seconds"]:
        lines += ["", f"The cost includes {t['overhead_seconds']:.1f} s of the containers' time outside shard work (start-up, model load, Volume sync), each shard paying its container's since the previous shard; idle time before a container scales down is in no shard's."]
    if t["failed_attempts_usd"]:
        count = sum(1 for dollars in report.failed_attempts_usd.values() if dollars)
        lines += ["", f"The cost includes {format_usd(t['failed_attempts_usd'])} billed for the failed attempts of {count} shard(s) (Modal bills a container that fails too)."]
    slowest = sorted((r for r in report.results if r.status == "done"), key=lambda r: -r.seconds)[:3]
    if slowest:
        lines += ["", "Slowest shards: " + ", ".join(f"`{r.shard}` {r.seconds:.1f} s" for r in slowest)]
    if report.not_started:
        lines += ["", f"**Stopped at the cost limit**: {len(report.not_started)} shard(s) not started. Resume, raising its `--max-cost`:", "", f"```\n{resume_command}\n```"]
    if report.failed:
        lines += ["", "## Failed shards", ""]
        lines += [f"- `{shard}`: {error[:500]}" for shard, error in report.failed.items()]
        lines += ["", "Resume (done shards are skipped):", "", f"```\n{resume_command}\n```"]
    return "\n".join(lines)


def text_histogram(edges: list[int], counts: list[int], width: int = 40) -> str:
    """A histogram in text, one bar per bin, for markdown artifacts and terminals."""
    peak = max(counts) if counts and max(counts) else 1
    lines = []
    for low, high, count in zip(edges, edges[1:], counts):
        bar = "█" * round(width * count / peak)
        lines.append(f"{low:>5}–{high - 1:<5} {bar} {count}")
    return "\n".join(lines)


def pipeline_resume(run: RunConfig, reports: dict[str, StageReport]) -> tuple[str, str] | None:
    """How to go on after a pipeline run that did not finish: (what to say, the command), or None when nothing is left.

    From the stage the cost limit stopped, else the first stage with failed shards, else the first of the
    run's stages without a report (it could not start); that stage and every later one, done shards skipped.
    """
    if stopped := next((stage for stage, report in reports.items() if report.not_started), None):
        return "Resume with a higher --max-cost (raise the one below; done shards are skipped):", resume_command(run, stopped, shards_of(run, reports[stopped]))
    if first_failed := next((stage for stage, report in reports.items() if report.failed), None):
        return "Once the cause is fixed, rerun (done shards are skipped):", resume_command(run, first_failed, shards_of(run, reports[first_failed]))
    if stopped_at := next((stage for stage in run.stages if stage not in reports), None):
        return f"Once {stopped_at} can start, rerun (done shards are skipped):", resume_command(run, stopped_at)
    return None


def cli_program() -> str:
    """How to call this install's CLI from any folder: `fineweb-modal` when PATH finds this one, else its full path."""
    installed = Path(sys.prefix) / "bin" / "fineweb-modal"
    on_path = shutil.which("fineweb-modal")
    if not installed.is_file() or (on_path and Path(on_path).resolve() == installed.resolve()):
        return "fineweb-modal"
    return shlex.quote(str(installed))  # e.g. .venv/bin/fineweb-modal, as the README calls it, with no venv activated


def shards_of(run: RunConfig, report: StageReport) -> list[str] | None:
    """The names of the shards a stage of a run that chose shards (`--shards`, `--only failed`) went over; None for all."""
    if not run.shards and not run.only:
        return None
    return sorted({r.shard for r in report.results} | set(report.failed) | set(report.not_started))


def resume_command(run: RunConfig, stage: str, shards: list[str] | None = None) -> str:
    """The CLI command that reruns a stage and the run's stages after it, over `shards` (names: an index given at the
    first stage may name another shard in a later one's listing), else the run's own selection, with its budget too;
    shards done with the same config are skipped."""
    stages = run.stages[run.stages.index(stage) :] if stage in run.stages else (stage,)
    q = shlex.quote  # a data dir with a space, a prefix with a quote: the command still pastes into a shell
    parts = [f"{cli_program()} run"]
    if run.download is not None and "download" in stages:
        parts.append(f"--source {q(run.download.source)}" + (f" --subset {q(run.download.subset)}" if run.download.subset else ""))
    data_dir = Path(run.dataset.data_dir).resolve()  # so it runs from any folder
    parts += [f"--name {q(run.dataset.name)}", f"--data-dir {q(str(data_dir))}", f"--split {q(run.dataset.split)}", f"--stages {','.join(stages)}"]
    parts += [f"--backend {run.backend}", f"--model {q(run.chunk.model)}", f"--max-tokens {run.chunk.max_tokens}"]
    if chosen := shards if shards is not None else list(run.shards):  # the run's own selection, not every shard
        parts.append(f"--shards {q(','.join(chosen))}")
    if run.max_cost is not None:  # pasted without it, a rerun would have no budget at all
        parts.append(f"--max-cost {run.max_cost:g}")
    if "chunk" in stages:
        parts += [f"--overlap {run.chunk.overlap}", f"--text-column {q(run.chunk.text_column)}", f"--keep-columns {q(','.join(run.chunk.keep_columns))}"]
    if run.embed.prefix:
        parts.append(f"--prefix {q(run.embed.prefix)}")
    if "embed" in stages:
        parts.append(f"--engine {run.embed.engine}" + (f" --tei-url {q(run.embed.tei_url)}" if run.embed.tei_url else ""))
        if run.embed.tei_served_model:
            parts.append(f"--tei-served-model {q(run.embed.tei_served_model)}")
        if run.embed.dimensions:
            parts.append(f"--dimensions {run.embed.dimensions}")
        if run.embed.embedding_dtype != "float32":
            parts.append(f"--embedding-dtype {run.embed.embedding_dtype}")
        if run.embed.compile != "auto":
            parts.append(f"--compile {run.embed.compile}")
    return " ".join(parts)
