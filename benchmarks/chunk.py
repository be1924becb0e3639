"""Chunking side by side, in one process, alternating, median of several repetitions.

- `stage`: the chunk stage end to end (arrow shard in → parquet out, ledger included), via run_shard.
- `raw`: `encode_batch` of the same tokenizer over the same texts, truncation and padding off — the limit.
- `seed_style`: the reference pipeline's algorithm: per-row `encode`, token slices with stride
  max − overlap, `decode` of each slice, 4 threads over 200-row batches.
The stage and raw run with the tokenizer's own threading off, so the ratio measures the chunker's overhead.
Every rate counts the source documents' tokens. Scaling: k shards at once through the local backend
(k worker processes) against raw `encode_batch` in k processes, alternating, median of the repeats.

    python -m benchmarks.chunk [--tokens 1000000] [--repeats 5]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.common import alternate, merge_results, verdict  # noqa: E402
from benchmarks.corpus import web_like_documents, write_shard  # noqa: E402
from fineweb_modal.config import build_run_config  # noqa: E402
from fineweb_modal.models import load_tokenizer, model_info  # noqa: E402
from fineweb_modal.shards import ShardJob, layout_for, run_shard  # noqa: E402

GOALS = {"stage_vs_raw": 0.85, "stage_vs_seed": 1.5, "scaling_vs_raw": 0.9}


def seed_style(texts: list[str], tokenizer, max_tokens: int, overlap_tokens: int) -> int:
    """The reference's chunker: encode each row, slice ids with stride max − overlap, decode every slice."""
    stride = max_tokens - overlap_tokens

    def rows(batch: list[str]) -> int:
        chunks = 0
        for text in batch:
            ids = tokenizer.encode(text).ids
            for start in range(0, len(ids), stride):
                tokenizer.decode(ids[start : start + max_tokens])
                chunks += 1
        return chunks

    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(rows, [texts[i : i + 200] for i in range(0, len(texts), 200)]))


def _encode_file_texts(args: tuple[str, str]) -> int:
    path, model_path = args
    from fineweb_modal.storage import open_arrow_batches

    schema, batches = open_arrow_batches(Path(path))
    texts = [t for b in batches for t in b.column("text").to_pylist()]
    return sum(len(e) for e in load_tokenizer(model_path).encode_batch(texts, add_special_tokens=False))


def main() -> None:
    """Measure, print, and merge the entries into benchmarks/results/latest.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fineweb-bench-"))
    try:
        texts = web_like_documents(args.tokens)
        run = build_run_config(name="bench", data_dir=str(work), stages="chunk")
        layout = layout_for(run)
        shard_path = write_shard(texts, layout.output_path("download", "s0"))
        tokenizer = load_tokenizer(model_info(run.chunk.model).path)
        tokens = sum(len(e) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
        window = run.chunk.max_tokens - 2

        def stage() -> None:
            layout.ledger_path("chunk", "s0").unlink(missing_ok=True)
            run_shard(ShardJob(stage="chunk", shard="s0", run=run))

        seconds = alternate(
            {
                "stage": stage,
                "raw": lambda: tokenizer.encode_batch(texts, add_special_tokens=False),
                "seed_style": lambda: seed_style(texts, tokenizer, run.chunk.max_tokens, int(run.chunk.overlap * window)),
            },
            args.repeats,
        )
        rates = {name: tokens / s for name, s in seconds.items()}
        chunk_entry = {
            "tokens": tokens,
            "documents": len(texts),
            "shard_mb": round(shard_path.stat().st_size / 1e6, 1),
            "tokens_per_s": {k: round(v) for k, v in rates.items()},
            "stage_vs_raw": round(rates["stage"] / rates["raw"], 3),
            "stage_vs_seed_style": round(rates["stage"] / rates["seed_style"], 3),
        }
        chunk_entry["verdict"] = (
            f"{verdict(chunk_entry['stage_vs_raw'], GOALS['stage_vs_raw'])} stage ≥ {GOALS['stage_vs_raw']}× raw; "
            f"{verdict(chunk_entry['stage_vs_seed_style'], GOALS['stage_vs_seed'])} stage ≥ {GOALS['stage_vs_seed']}× seed style"
        )

        scaling = {}
        for cores in range(1, args.max_cores + 1):
            shards = []
            for i in range(cores):
                path = layout.output_path("download", f"k{i}")
                if not path.exists():
                    shutil.copy(shard_path, path)
                shards.append(f"k{i}")
            from tasks.backends import LocalBackend

            backend = LocalBackend(max_workers=cores)

            def chunk_all() -> None:
                for shard in shards:
                    layout.ledger_path("chunk", shard).unlink(missing_ok=True)
                with ThreadPoolExecutor(cores) as pool:
                    list(pool.map(lambda s: backend.run(ShardJob(stage="chunk", shard=s, run=run)), shards))

            with ProcessPoolExecutor(cores) as raw_pool:
                jobs = [(str(shard_path), model_info(run.chunk.model).path)] * cores
                # The warm-up starts every worker process and loads the tokenizer in each, for both.
                seconds = alternate({"stage": chunk_all, "raw": lambda: list(raw_pool.map(_encode_file_texts, jobs))}, args.repeats)
            backend.close()
            stage_rate, raw_rate = cores * tokens / seconds["stage"], cores * tokens / seconds["raw"]
            scaling[cores] = {"stage_tokens_per_s": round(stage_rate), "raw_tokens_per_s": round(raw_rate)}
        base = scaling[1]
        for cores, entry in scaling.items():
            entry["stage_speedup"] = round(entry["stage_tokens_per_s"] / base["stage_tokens_per_s"], 2)
            entry["raw_speedup"] = round(entry["raw_tokens_per_s"] / base["raw_tokens_per_s"], 2)
            entry["stage_speedup_vs_raw"] = round(entry["stage_speedup"] / entry["raw_speedup"], 3)
        top = scaling[max(scaling)]
        entries = {
            "chunk": chunk_entry,
            "chunk-scaling": {
                "cores": scaling,
                "verdict": f"{verdict(top['stage_speedup_vs_raw'], GOALS['scaling_vs_raw'])} speed-up ≥ {GOALS['scaling_vs_raw']}× raw's at {max(scaling)} cores",
            },
        }
        print(json.dumps(entries, indent=2))
        print(f"merged into {merge_results('chunk', entries)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
