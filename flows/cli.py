"""`fineweb-modal`: run the pipeline (or the demo) against a Prefect server, and manage a local one.

Exit codes: 0 every shard of every stage succeeded; 1 some shard failed (the others finished);
2 bad usage or config (nothing ran); 3 stopped at --max-cost (what ran finished; the rest can be resumed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from fineweb_modal.config import (
    BACKENDS,
    COMPILE_CHOICES,
    DEFAULT_KEEP_COLUMNS,
    EMBEDDING_DTYPES,
    ENGINES,
    STAGES,
    RunConfig,
    build_run_config,
)
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL
from flows import server

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_BAD_CONFIG, EXIT_MAX_COST = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="Hub dataset id (e.g. HuggingFaceFW/fineweb-edu) or a local folder of parquet/arrow/jsonl files; needed for the download stage")
    parser.add_argument("--subset", help="Hub config name, e.g. sample-10BT")
    parser.add_argument("--split", default="train", help="the split to read and write (default: train)")
    parser.add_argument("--name", help="dataset name under the data dir (default: folder name, or <repo>-<subset>)")
    parser.add_argument("--data-dir", default="./data", help="where shards, outputs and the ledger live (default: ./data)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}")
    parser.add_argument("--backend", default="local", choices=BACKENDS)
    parser.add_argument("--max-tokens", default="auto", help="tokens per chunk incl. [CLS]/[SEP]; auto = min(500, model limit - prefix)")
    parser.add_argument("--overlap", default=0.1, type=float, help="fraction of the window shared by neighbouring chunks, 0-0.5")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--prefix", default="", help="text put before every chunk when embedding (nomic: 'search_document: ')")
    parser.add_argument("--text-column", default="text", help="the source column holding the documents (default: text)")
    parser.add_argument("--keep-columns", default=",".join(DEFAULT_KEEP_COLUMNS), help="source columns copied into the chunk files ('' for none)")
    parser.add_argument("--shards", help="shard indices or names, comma-separated (default: all)")
    parser.add_argument("--only", choices=["failed"], help="run only the shards whose last attempt failed")
    parser.add_argument("--max-cost", type=float, help="dollars: start no shard that would take spent + in-flight estimate past this")
    parser.add_argument("--engine", default="transformers", choices=ENGINES, help="embedding engine")
    parser.add_argument("--tei-url", help="a running TEI server for --engine tei (the API key comes from TEI_API_KEY or the Prefect Secret 'tei-api-key')")
    parser.add_argument(
        "--tei-served-model", help="the model id that TEI reports when it serves --model under another name (e.g. '/repository' on Inference Endpoints)"
    )
    parser.add_argument("--dimensions", type=int, help="keep the first N dimensions (Matryoshka models such as nomic-embed-text-v1.5)")
    parser.add_argument("--embedding-dtype", default="float32", choices=EMBEDDING_DTYPES, help="how vectors are stored")
    parser.add_argument(
        "--compile", default="auto", choices=COMPILE_CHOICES, help="torch.compile the in-process model (auto: on CUDA; on: also on the CPU, ~15-30 s per worker)"
    )


def _add_dataset_flags(parser: argparse.ArgumentParser, name_required: bool = True) -> None:
    same = "as the run that made the outputs used"
    parser.add_argument("--name", required=name_required, help="the dataset's name under the data dir")
    parser.add_argument("--data-dir", default="./data", help="where the run wrote (default: ./data; on Modal: the Volume)")
    parser.add_argument("--split", default="train", help="(default: train)")
    parser.add_argument("--backend", default="local", choices=BACKENDS, help="local: the data dir; modal: the Volume")
    parser.add_argument("--max-tokens", default="auto", help=f"the chunk size, {same} (it names the output folders)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"the embedding model, {same}")
    parser.add_argument("--prefix", default="", help=f"the embedding prefix, {same}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineweb-modal",
        description="Chunk and embed a Hugging Face text dataset, shard by shard, with Prefect.",
        epilog="exit codes: 0 ok; 1 failed shards or problems found; 2 bad usage or config (nothing ran); 3 stopped at --max-cost; 130 interrupted",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build a small offline dataset and run the whole pipeline on it")
    demo.add_argument("--data-dir", default="./data", help="where the demo's source and outputs go (default: ./data)")
    run = commands.add_parser("run", help="run the pipeline's stages")
    _add_run_flags(run)
    commands.add_parser("serve", help="serve every flow as <flow>/local and <flow>/modal deployments (prefect.serve)")
    verify = commands.add_parser("verify", help="check every shard's chunk and embedding files; exit 1 on any problem")
    _add_dataset_flags(verify)
    verify.add_argument("--shards", help="shard indices or names among the chunked ones (default: every shard the dataset has)")
    fetch = commands.add_parser("fetch", help="copy one output shard (from the data dir or the Modal Volume) and preview it")
    _add_dataset_flags(fetch)
    fetch.add_argument("--stage", choices=["download", "chunk", "embed"], default="embed")
    fetch.add_argument("--shard", required=True, help="shard name or index")
    fetch.add_argument("--to", default=".", help="folder or file to write (default: the current folder, as <shard>-embeddings.parquet, -chunks.parquet or .arrow)")
    plan = commands.add_parser("plan", help="forecast chunks, tokens, GPU hours and $ per engine and GPU from a sample of every shard")
    _add_dataset_flags(plan, name_required=False)
    plan.add_argument("--source", help="a Hub dataset not downloaded yet: plan from its first documents and its row count (--name defaults from it)")
    plan.add_argument("--subset", help="the Hub dataset's subset (config), with --source")
    plan.add_argument("--text-column", default="text", help="the source column holding the text (default: text)")
    plan.add_argument("--overlap", type=float, default=0.1, help="the chunks' overlap, a fraction of the window (default: 0.1)")
    plan.add_argument("--shards", help="shard indices or names (default: all)")
    publish = commands.add_parser("publish", help="push chunks + embeddings as one Hugging Face dataset (HF_TOKEN or the Prefect Secret 'hf-token')")
    _add_dataset_flags(publish)
    publish.add_argument("--repo-id", required=True, help="org/name of the dataset repo")
    publish.add_argument("--dry-run", action="store_true", help="only write the folder that would be uploaded")
    publish.add_argument("--to", help="where to write that folder (default: a temp dir)")
    publish.add_argument("--public", action="store_true", help="create the repo public (default private)")
    publish.add_argument("--allow-partial", action="store_true", help="publish the embedded shards even if others are not (failed or not yet run); the card names them")
    publish.add_argument("--shards", help="shard indices or names among the chunked ones (default: every shard the dataset has)")
    status = commands.add_parser("status", help="per dataset and stage: shards done, failed, missing and stale, from the ledger, and settings that differ between shards")
    status.add_argument("--data-dir", default="./data")
    status.add_argument("--name", help="only this dataset (and the ones derived from it)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--backend", choices=["local", "modal"], default="local", help="modal: the ledger on the Volume (--data-dir is not used)")
    srv = commands.add_parser("server", help="a local Prefect server on 127.0.0.1")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--port", type=int, default=server.DEFAULT_PORT, help=f"for start: the port to try first (default: {server.DEFAULT_PORT}; a free one if taken)")
    return parser


def _run_kwargs(args: argparse.Namespace) -> dict:
    return {
        "source": args.source,
        "subset": args.subset,
        "split": args.split,
        "name": args.name,
        "data_dir": args.data_dir,
        "stages": args.stages.split(","),
        "backend": args.backend,
        "max_tokens": args.max_tokens,
        "overlap": args.overlap,
        "model": args.model,
        "prefix": args.prefix,
        "text_column": args.text_column,
        "keep_columns": [c for c in args.keep_columns.split(",") if c],
        "shards": args.shards,  # as given ("0,3"): one that names no shard (`--shards ""`) is refused, not read as every shard
        "engine": args.engine,
        "tei_url": args.tei_url,
        "tei_served_model": args.tei_served_model,
        "dimensions": args.dimensions,
        "embedding_dtype": args.embedding_dtype,
        "compile": args.compile,
        "only": args.only,
        "max_cost": args.max_cost,
    }


def _validated(**params) -> RunConfig:
    """The run config of these parameters, or ConfigError (main turns it into exit code 2, before anything runs)."""
    run = build_run_config(**params)
    _check_backend(run)
    return run


def _check_backend(run: RunConfig) -> None:
    if run.backend == "modal":
        from tasks.backends import MODAL_TOKEN_MISSING, modal_token_configured

        if not modal_token_configured():
            raise ConfigError(MODAL_TOKEN_MISSING)


def _connect() -> str:
    from fineweb_modal.report import cli_program

    api_url, started = server.ensure_api()
    if not started and not server.reachable(api_url):
        raise ConfigError(
            f"no Prefect API answers at PREFECT_API_URL={api_url}: start it (`{cli_program()} server start` for a local one), "
            "or unset PREFECT_API_URL to let this tool start its own"
        )
    info = server.status()
    if info and info["api_url"].rstrip("/") != api_url.rstrip("/"):
        info = None  # PREFECT_API_URL points elsewhere than this tool's server
    if started and info:
        taken = f" (port {server.DEFAULT_PORT} is taken)" if info["port"] != server.DEFAULT_PORT else ""
        print(f"Started a local Prefect server: UI {info['ui_url']}{taken} (log {info['log']}); stop it with `{cli_program()} server stop`.")
    elif info:
        print(f"Using the local Prefect server: UI {info['ui_url']}")
    else:
        print(f"Using the Prefect API at {api_url}")
    return api_url


def run_pipeline(kwargs: dict) -> int:
    """Validate, connect to Prefect, run the pipeline flow, print where things are; return the exit code."""
    run = _validated(**kwargs)
    _connect()  # first: Prefect reads its API URL when its modules are first imported
    from flows.stage import check_before_work

    check_before_work(run)  # an empty source, a missing text column, a TEI that is down: refused before a flow run is made
    from flows.outcome import outcome
    from flows.pipeline import pipeline

    from fineweb_modal.interrupt import stop_requested

    try:
        with _stopping_on_ctrl_c():
            state = pipeline(**kwargs, return_state=True)
    except KeyboardInterrupt:
        return _interrupted(run)
    if stop_requested():  # Prefect's engine may take the KeyboardInterrupt itself and end the run with its shards Interrupted
        return _interrupted(run)
    reports = outcome(state)
    if isinstance(reports, ConfigError):  # the first stage refused to start (e.g. no room on the disk): nothing ran
        print(f"error: {reports}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    _print_outcome(run, reports if isinstance(reports, dict) else {})
    if state.is_completed():
        print(f"\nDone: {state.message}")
        return EXIT_OK
    print(f"\nFailed: {state.message}", file=sys.stderr)
    from fineweb_modal.report import pipeline_resume

    reports = reports if isinstance(reports, dict) else {}
    if resume := pipeline_resume(run, reports):
        print(f"{resume[0]}\n  {resume[1]}", file=sys.stderr)
    return EXIT_MAX_COST if any(report.not_started for report in reports.values()) else EXIT_FAILED_SHARDS


def _interrupted(run: RunConfig) -> int:
    """After Ctrl-C: say how to resume, forget the stop request (a later command in this process must run), exit 130."""
    from fineweb_modal.interrupt import withdraw_stop
    from fineweb_modal.report import resume_command

    withdraw_stop()
    print(f"\nInterrupted: what finished is recorded. Resume (done shards are skipped):\n  {resume_command(run, run.stages[0])}", file=sys.stderr)
    return EXIT_INTERRUPTED


@contextlib.contextmanager
def _stopping_on_ctrl_c() -> Iterator[None]:
    """Ctrl-C also asks the shard work to stop: queued shards end at once, not after every started one ran."""
    from fineweb_modal.interrupt import request_stop, withdraw_stop

    # Signal handlers belong to the main thread; and an interrupt ignored by whoever started us stays ignored.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        request_stop()
        signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without this handler

    withdraw_stop()
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_outcome(run: RunConfig, reports: dict) -> None:
    from fineweb_modal.costs import format_usd
    from fineweb_modal.shards import layout_for

    layout = layout_for(run)
    print()
    for stage, report in reports.items():
        totals = report.totals()
        skipped = sum(r.status == "skipped" for r in report.results)
        money = format_usd(totals["cost_usd"]) if run.backend == "modal" else f"≈{format_usd(totals['modal_estimate_usd'])} on Modal"
        print(
            f"{stage:<10} {len(report.results)} ok ({skipped} skipped), {len(report.failed)} failed · "
            f"{report.amount()} · {totals['seconds']:.1f} s · {money} · {layout.shard_dir(stage)}"
        )
        for shard, error in report.failed.items():
            print(f"           {shard}: {error[:200]}")


def print_status(data_dir: str, name: str | None, as_json: bool, backend: str = "local") -> int:
    """Print the ledger's view of a data dir; exit 1 when any shard is failed, missing or stale, a stage's shards were made with
    different settings, or nothing is found (a typo must not pass)."""
    import json

    from fineweb_modal.costs import format_usd
    from fineweb_modal.report import group_digits
    from tasks.backends import MODAL_DATA_DIR, get_backend

    if backend == "modal" and (warning := get_backend("modal").reader_warning("status")):
        print(f"warning: {warning}", file=sys.stderr)
    statuses = get_backend(backend).ledger_status(data_dir, name)
    where = f"the Modal Volume ({MODAL_DATA_DIR})" if backend == "modal" else data_dir
    if as_json:
        print(json.dumps([s.as_dict() for s in statuses], indent=2))
    elif not statuses:
        print(f"no ledger records under {where}" + (f" for {name}" if name else ""))
    else:
        print(
            f"{'dataset':<48} {'stage':<10} {'split':<6} {'done':>5} {'failed':>6} {'missing':>7} {'stale':>5} "
            f"{'docs':>11} {'chunks':>12} {'tokens':>14} {'seconds':>9} {'cost':>9}"
        )
        for s in statuses:
            print(
                f"{s.dataset:<48} {s.stage:<10} {s.split:<6} {len(s.done):>5} {len(s.failed):>6} {len(s.missing):>7} {len(s.stale):>5} "
                f"{group_digits(s.docs):>11} {group_digits(s.chunks):>12} {group_digits(s.tokens):>14} {s.seconds:>9.1f} {format_usd(s.cost_usd):>9}"
            )
            for shard, error in s.failed.items():
                print(f"    failed  {shard}: {error[:150]}")
            for shard in s.missing[:10]:
                print(f"    missing {shard}")
            for shard in s.stale[:10]:
                print(f"    stale   {shard}: made from an input that has changed since; rerun {s.stage}")
            if s.mixed:
                print(f"    mixed   {s.mixed}")
    return EXIT_OK if statuses and all(s.clean for s in statuses) else EXIT_FAILED_SHARDS


def fetch(dataset: dict, stage: str, shard: str, to: Path) -> int:
    """Copy one output shard to a local path and print a preview (no Prefect server needed)."""
    from fineweb_modal.verify import preview
    from flows.fetch import fetch_shard, stages_for

    run = _validated(stages=stages_for(stage), **dataset)
    try:
        path = fetch_shard(run, stage, shard, to)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(f"fetched {path}")
    print(preview(path, text_column=run.chunk.text_column))
    return EXIT_OK


def plan(dataset: dict, shards: str | None, source: str | None = None, subset: str | None = None, text_column: str = "text", overlap: float = 0.1) -> int:
    """Run the plan flow and print its forecast."""
    if not dataset["name"] and not source:
        raise ConfigError("plan needs --name (a downloaded dataset) or --source (a Hub dataset not downloaded yet)")
    if subset and not source:
        raise ConfigError("--subset is for a Hub dataset given with --source")
    plan_params = {"source": source, "subset": subset, "text_column": text_column, "overlap": overlap}
    _validated(stages=["chunk"], keep_columns=[], shards=shards, **dataset, **plan_params)
    _connect()
    from flows.outcome import outcome
    from flows.plan import plan as plan_flow

    state = plan_flow(**dataset, **plan_params, shards=shards.split(",") if shards else None, return_state=True)
    rows = outcome(state)
    if not state.is_completed():
        print(f"error: {rows}", file=sys.stderr)
        return EXIT_BAD_CONFIG if isinstance(rows, ConfigError) else EXIT_FAILED_SHARDS
    print(f"{'engine':<13} {'gpu':<6} {'chunks':>12} {'embed tokens':>16} {'tokens/s':>11} {'GPU hours':>10} {'cost $':>9}  rate from")
    for row in rows:
        print(
            f"{row['engine']:<13} {row['gpu']:<6} {row['chunks']:>12,} {row['embed tokens']:>16,} {row['tokens/s']:>11,} "
            f"{row['GPU hours']:>10} {row['cost $']:>9}  {row['rate from']}"
        )
    return EXIT_OK


def publish(dataset: dict, repo_id: str, dry_run: bool, to: str | None, private: bool, allow_partial: bool = False, shards: str | None = None) -> int:
    """Run the publish flow; print the folder (dry run) or the dataset's URL."""
    if dataset.pop("backend") != "local":
        from fineweb_modal.report import cli_program

        print(f"error: publish reads a local data dir; copy Modal shards here first with `{cli_program()} fetch`", file=sys.stderr)
        return EXIT_BAD_CONFIG
    _validated(stages=["embed"], shards=shards, **dataset)
    _connect()
    from flows.outcome import outcome
    from flows.publish import publish as publish_flow

    chosen = shards.split(",") if shards else None
    state = publish_flow(repo_id=repo_id, **dataset, dry_run=dry_run, output_dir=to, private=private, allow_partial=allow_partial, shards=chosen, return_state=True)
    published = outcome(state)
    if not state.is_completed():
        print(f"error: {published}", file=sys.stderr)
        return EXIT_BAD_CONFIG if isinstance(published, ConfigError) else EXIT_FAILED_SHARDS
    print(f"dry run: the folder that would be uploaded is {published}" if dry_run else f"published: {published}")
    return EXIT_OK


def verify(dataset: dict, shards: str | None = None) -> int:
    """Run the verify flow; exit 1 when any shard has a problem."""
    _validated(stages=["embed"], shards=shards, **dataset)
    _connect()
    from flows.outcome import outcome
    from flows.verify import verify as verify_flow

    state = verify_flow(**dataset, shards=shards.split(",") if shards else None, return_state=True)
    rows = outcome(state)
    if isinstance(rows, ConfigError):
        print(f"error: {rows}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    for row in rows if isinstance(rows, list) else []:
        counts = " ".join(f"{key}={row[key]}" for key in ("chunks", "embeddings", "dims") if row[key] is not None)
        print(f"{row['shard']:<32} {'ok' if row['ok'] else 'PROBLEM'} {counts} {row['problems']}".rstrip())
    print(state.message)
    return EXIT_OK if state.is_completed() else EXIT_FAILED_SHARDS


def demo(data_dir: str) -> int:
    """Build the offline demo dataset (4 shards, 200 documents of Python's docs) and run every stage on it."""
    from fineweb_modal.demo import DEMO_NAME, write_demo_source

    source = write_demo_source(Path(data_dir) / "_sources" / DEMO_NAME)
    print(f"Demo source: {source} (4 parquet shards of CPython's bundled documentation, fineweb-edu's columns)")
    kwargs = dict(source=str(source), data_dir=data_dir, stages=list(STAGES), backend="local")
    code = run_pipeline(kwargs)
    if code == EXIT_OK:
        print(f"Ledger records: {Path(data_dir).resolve()}/<dataset>/_ledger/<stage>/train/<shard>.json")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fineweb-modal` console script."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at the interpreter's exit
        return code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except BrokenPipeError:  # `… | head` closed its end: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 1  # what Python itself exits with on a broken pipe


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "server":
        if args.action == "start":
            already = server.status()
            info = server.start(port=args.port)
            if already:
                print(f"already running (this FINEWEB_MODAL_HOME's server), on port {info['port']}")
            elif info["port"] != args.port:
                print(f"port {args.port} is taken: started on {info['port']} instead")
            print(f"Prefect server on {info['ui_url']} (API {info['api_url']}, pid {info['pid']}, log {info['log']})")
            print(f"Use it from other shells: export PREFECT_API_URL={info['api_url']}")
        elif args.action == "stop":
            print("stopped" if server.stop() else "no server was running")
        else:
            info = server.status()
            print(f"running: {info['ui_url']} (pid {info['pid']})" if info else "not running")
        return EXIT_OK
    if args.command == "demo":
        return demo(args.data_dir)
    if args.command == "status":
        return print_status(args.data_dir, args.name, args.json, args.backend)
    if args.command == "serve":
        _connect()
        from flows.serve import serve_all

        serve_all()
        return EXIT_OK
    dataset = {k: getattr(args, k) for k in ("name", "data_dir", "split", "backend", "max_tokens", "model", "prefix")}
    if args.command == "fetch":
        return fetch(dataset, args.stage, args.shard, Path(args.to))
    if args.command == "verify":
        return verify(dataset, args.shards)
    if args.command == "plan":
        return plan(dataset, args.shards, args.source, args.subset, args.text_column, args.overlap)
    if args.command == "publish":
        return publish(dataset, args.repo_id, args.dry_run, args.to, not args.public, args.allow_partial, args.shards)
    return run_pipeline(_run_kwargs(args))


if __name__ == "__main__":
    sys.exit(main())
