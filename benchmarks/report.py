"""Print benchmarks/results/latest.json as the markdown table README shows.

    python -m benchmarks.report
"""

from __future__ import annotations

import json
import platform

from benchmarks.common import RESULTS


def rows(entries: dict) -> list[str]:
    """One markdown row per entry: what was measured, against what, and the verdict."""
    out = ["| entry | measured | ratio vs baseline (same run) | verdict |", "|---|---|---|---|"]
    if chunk := entries.get("chunk"):
        rates = chunk["tokens_per_s"]
        out.append(
            f"| chunk | stage {rates['stage']:,} tokens/s on {chunk['tokens']:,} tokens ({chunk['shard_mb']} MB shard) "
            f"| {chunk['stage_vs_raw']}× raw `encode_batch` ({rates['raw']:,}/s); {chunk['stage_vs_seed_style']}× seed style ({rates['seed_style']:,}/s) | {chunk['verdict']} |"
        )
    if scaling := entries.get("chunk-scaling"):
        cells = "; ".join(f"{k} cores: stage {v['stage_speedup']}×, raw {v['raw_speedup']}×" for k, v in scaling["cores"].items())
        out.append(f"| chunk scaling | {cells} | speed-up vs raw's at the most cores | {scaling['verdict']} |")
    if cpu := entries.get("embed-cpu"):
        out.append(
            f"| embed (CPU) | engine ({cpu.get('engine_dtype', 'float32')}) {cpu['tokens_per_s']['engine']:,} tokens/s, "
            f"MFU {cpu['mfu_vs_measured_peak']['engine']:.0%} of its measured {cpu.get('engine_dtype', 'float32')} peak; cos ≥ {cpu['min_cosine_vs_sentence_transformers']} "
            f"| {cpu['engine_vs_sentence_transformers']}× sentence-transformers (fp32 engine: {cpu.get('engine_fp32_vs_sentence_transformers', '—')}×"
            + "".join(f"; {name.replace('_', ' ')}: {ratio}×" for name, ratio in cpu.get("compiled_vs_sentence_transformers", {}).items())
            + f"); {cpu['engine_vs_seed_style']}× seed style "
            f"| {'PASS' if cpu['pass'] else 'FAIL'}: {cpu['goal']} |"
        )
    if gpu := entries.get("embed-gpu"):
        if gpu.get("device") == "no GPU":
            out.append("| embed (GPU) | no GPU | — | not measured |")
        else:
            best = gpu.get("best_engine", "engine")
            out.append(
                f"| embed (GPU) | {gpu['device']}, end to end: {best} {gpu['tokens_per_s'][best]:,} tokens/s, MFU {gpu['mfu_vs_measured_peak'][best]:.0%} of measured bf16 peak "
                f"| {gpu['engine_vs_seed_style']}× seed style ({gpu['tokens_per_s']['seed_style']:,}/s) | {'PASS' if gpu['pass'] else 'FAIL'}: {gpu['goal']} |"
            )
    if fp8 := entries.get("embed-fp8"):
        cells = "; ".join(
            f"{label}: " + ", ".join(f"{k} {v}" for k, v in model["min_cosine_vs_fp32"].items()) for label, model in fp8["models"].items()
        )
        verdict = "fp8 usable" if fp8["pass"] else f"fp8 left out: no selection keeps min cos ≥ {fp8['min_cosine_bar']} on trained weights"
        out.append(f"| embed fp8 (numerics, CPU) | min cos vs fp32 over {fp8['chunks']} chunks: {cells} | bf16 in the same run | {verdict} |")
    if host := entries.get("embed-host"):
        out.append(
            f"| embed host side | device {host['device']}: embed_shard keeps it busy {host['efficiency']['embed_shard']:.1%} of the time "
            f"(first run after {host['start_s']['embed_shard']} s, last write {host['tail_s']['embed_shard']} s) "
            f"| {host['embed_shard_vs_serial']}× a one-step-after-another loop ({host['efficiency']['serial']:.1%}) | {'PASS' if host['pass'] else 'FAIL'}: {host['goal']} |"
        )
    if orchestration := entries.get("orchestration"):
        out.append(
            f"| orchestration | chunk flow over {orchestration['shards']} tiny shards: {orchestration['flow_seconds']} s "
            f"| {orchestration['overhead_seconds_per_shard']} s per shard over a plain loop ({orchestration['loop_seconds']} s) | {orchestration['verdict']} |"
        )
    if memory := entries.get("memory-chunk"):
        out.append(
            f"| memory (chunk) | peak RSS growth {memory['rss_growth_mb']} MB on a {memory['shard_mb']} MB shard | {memory['growth_over_shard']}× the shard | {memory['verdict']} |"
        )
    if memory := entries.get("memory-embed"):
        sizes = ", ".join(f"{n:,} chunks: {g} MB" for n, g in zip(memory["chunks"], memory["rss_growth_mb"]))
        if runs := memory.get("rss_growth_mb_runs"):
            sizes += f" (median of {len(next(iter(runs.values())))})"
        out.append(f"| memory (embed) | peak RSS growth {sizes} | {memory['largest_over_smallest']}× from the smallest to the largest | {memory['verdict']} |")
    return out


def main() -> None:
    """Print the table."""
    latest = json.loads((RESULTS / "latest.json").read_text())
    print(f"Measured {latest.get('updated', '?')} on {platform.machine()}, {platform.python_version()}:\n")
    print("\n".join(rows(latest["entries"])))


if __name__ == "__main__":
    main()
