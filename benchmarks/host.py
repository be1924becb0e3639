"""How much of a fast device's time `embed_shard`'s host side costs: reading, tokenizing, packing, writing.

Measured without a GPU. The device is simulated by `SimulatedDevice`: the engine's real `prepare` (the
tokenizer, packing) runs as always; its `run` makes LAUNCHES_PER_BATCH short GIL-releasing torch calls per
batch (the kernel launches a compiled 12-layer encoder makes, which a busy Python thread can hold up) and
advances a clock by the batch's tokens / rate; at the end of each block the host waits for the clock, as
`.cpu()` waits for the GPU. Everything else is real: the parquet reader, the tokenizer, the helper and
writer threads, the GIL, the part files and the output file.

efficiency = the device's busy seconds / wall seconds (1.0: the host never kept the device waiting). The
device's rate is this host's measured tokenizer rate / HOST_OVER_DEVICE, a harder ratio than a GPU
machine's (16 cores tokenize ~5x what one H100 embeds). Baseline in the same run: the same steps one after
another per block (read, tokenize, run, write), as the seed's loop did. Alternating, median of --repeats.

    python -m benchmarks.host
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import merge_results

LAUNCHES_PER_BATCH = 130  # kernels per forward of a compiled 12-layer encoder, about
HOST_OVER_DEVICE = 3.0
GOAL_EFFICIENCY = 0.95


class SimulatedDevice:
    """An engine whose device is a clock (see the module docstring); `prepare` is the real engine's. Not a model: vectors are constant."""

    def __init__(self, engine, tokens_per_s: float, launches_per_batch: int = LAUNCHES_PER_BATCH):
        self.engine, self.tokens_per_s, self.launches_per_batch = engine, tokens_per_s, launches_per_batch
        self.dims, self.tokens_embedded = engine.dims, 0
        self.busy_s, self.free_at = 0.0, 0.0
        self.first_run_at: float | None = None
        self.last_run_at = 0.0
        self._a, self._out = torch.ones(4, 4), torch.empty(4, 4)

    def prepare(self, texts, token_counts=None, row_names=None):
        """The real engine's tokenizing and packing."""
        return self.engine.prepare(texts, token_counts, row_names)

    def metadata(self) -> dict[str, str]:
        """The real engine's metadata."""
        return self.engine.metadata()

    def run(self, prepared) -> np.ndarray:
        """Launch each batch, advance the device clock by its tokens, wait for the clock at the block's end."""
        self.first_run_at = self.first_run_at or time.perf_counter()
        for batch in prepared.batches:
            for _ in range(self.launches_per_batch):
                torch.mm(self._a, self._a, out=self._out)
            seconds = int(batch["input_ids"].numel()) / self.tokens_per_s
            self.free_at = max(self.free_at, time.perf_counter()) + seconds
            self.busy_s += seconds
        if (wait := self.free_at - time.perf_counter()) > 0:
            time.sleep(wait)
        self.tokens_embedded += prepared.tokens
        self.last_run_at = time.perf_counter()
        vectors = np.zeros((prepared.rows, self.dims), np.float32)
        vectors[:, 0] = 1.0
        return vectors


def serial_loop(chunk_file: Path, output: Path, device: SimulatedDevice, block_rows: int) -> None:
    """The baseline: per block read, tokenize, run, write — one after another."""
    with pq.ParquetWriter(output, pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), device.dims))])) as writer:
        for block in pq.ParquetFile(chunk_file).iter_batches(batch_size=block_rows, columns=["id", "chunk_text"]):
            vectors = device.run(device.prepare(block.column("chunk_text").to_pylist()))
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), device.dims)
            writer.write_table(pa.Table.from_arrays([block.column("id"), embedding], names=["id", "embedding"]))


def host_entry(tokens: int, repeats: int, host_over_device: float = HOST_OVER_DEVICE, inputs: Path | None = None) -> dict:
    """The host-overhead comparison: embed_shard vs the serial loop against the same simulated device."""
    from transformers import NomicBertConfig, NomicBertModel

    from benchmarks.embed import NOMIC_PREFIX, BenchEmbedConfig, prepare_gpu_inputs
    from fineweb_modal import embedding
    from fineweb_modal.embedding import TransformersEngine, embed_shard

    if inputs is None:
        inputs = Path(tempfile.mkdtemp(prefix="host-bench-"))
        prepare_gpu_inputs(inputs, tokens)
    chunk_file = inputs / "chunks.parquet"
    # A one-layer model: only its packing check runs; the packed batches are what a GPU engine would get.
    tiny = NomicBertModel(NomicBertConfig(n_layer=1, n_embd=64, n_head=2, n_inner=128)).eval()
    engine = TransformersEngine(str(inputs / "nomic-shape"), prefix=NOMIC_PREFIX, model=tiny, device="cpu", attention="packed", compile=False, batch_tokens=embedding.GPU_BATCH_TOKENS)
    engine.dims = 768  # the output a nomic-shaped model writes

    sample = pq.read_table(chunk_file, columns=["chunk_text"]).column("chunk_text").to_pylist()[: embedding.READ_BLOCK_ROWS]
    engine.prepare(sample)  # warm the tokenizer

    def tokenizer_rate_once() -> float:
        start = time.perf_counter()
        return engine.prepare(sample).tokens / (time.perf_counter() - start)

    tokenizer_rate = max(tokenizer_rate_once() for _ in range(3))  # the best of three: a load spike must not set the pace
    device_rate = tokenizer_rate / host_over_device

    out = Path(tempfile.mkdtemp(prefix="host-bench-out-"))
    runs: dict[str, list[dict]] = {"embed_shard": [], "serial": []}
    for _ in range(repeats):
        for name, results in runs.items():
            device = SimulatedDevice(engine, device_rate)
            start = time.perf_counter()
            if name == "embed_shard":
                embed_shard(chunk_file, out / "e.parquet", BenchEmbedConfig(), out / "parts", engine=device)
            else:
                serial_loop(chunk_file, out / "serial.parquet", device, embedding.READ_BLOCK_ROWS)
            end = time.perf_counter()
            results.append(
                {
                    "efficiency": device.busy_s / (end - start),
                    "start_s": device.first_run_at - start,
                    "tail_s": end - device.last_run_at,
                    "wall_s": end - start,
                    "tokens": device.tokens_embedded,
                }
            )
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    efficiency = median["embed_shard"]["efficiency"]
    return {
        "device": f"simulated, {device_rate:,.0f} tokens/s (this host's tokenizer rate / {host_over_device:g}); host: {os.cpu_count()} cores",
        "tokenizer_tokens_per_s": round(tokenizer_rate),
        "device_tokens_per_s": round(device_rate),
        "chunks": pq.read_metadata(chunk_file).num_rows,
        "tokens": runs["embed_shard"][0]["tokens"],
        "efficiency": {name: round(m["efficiency"], 3) for name, m in median.items()},
        "efficiency_runs": {name: [round(r["efficiency"], 3) for r in rs] for name, rs in runs.items()},
        "start_s": {name: round(m["start_s"], 2) for name, m in median.items()},
        "tail_s": {name: round(m["tail_s"], 2) for name, m in median.items()},
        "embed_shard_vs_serial": round(efficiency / median["serial"]["efficiency"], 3),
        "goal": f"embed_shard keeps the device busy >= {GOAL_EFFICIENCY:.0%} of the time",
        "pass": efficiency >= GOAL_EFFICIENCY,
    }


def main() -> None:
    """Run the entry, merge it into benchmarks/results, print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4_000_000, help="size of the generated corpus, as benchmarks.corpus counts tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--host-over-device", type=float, default=HOST_OVER_DEVICE, help="tokenizer rate / simulated device rate")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the simulated launches are tiny; the tokenizer's own threads use the cores
    entry = host_entry(args.tokens, args.repeats, args.host_over_device)
    merge_results("embed-host", {"embed-host": entry})
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
