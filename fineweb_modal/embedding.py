"""Chunks → L2-normalized vectors, rows in the chunk file's order, through one of two engines.

- `transformers`: the model in this process. Batches are length-sorted and filled to a budget of padded
  tokens, so padding stays small; pooling follows the model's sentence-transformers config; bf16 on CUDA;
  on CPU fp16 where the CPU multiplies it natively (AVX512-FP16/AMX-FP16) and the vectors agree with fp32,
  else fp32.
- `tei`: a Text Embeddings Inference server (`fineweb_modal.tei`).

A shard is embedded in parts of READ_BLOCK_ROWS rows, each written atomically under a parts folder and
appended to the shard's one parquet (a temp file until the last part); a restarted shard resumes after the
last whole part. Memory is bounded by one part, not the shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fineweb_modal.attention import PACKED_KERNELS
from fineweb_modal.errors import BadDataError, ConfigError
from fineweb_modal.heap import pin_mmap_threshold
from fineweb_modal.interrupt import raise_if_stop_requested
from fineweb_modal.models import ModelInfo, check_dimensions, encode_for_model, hidden_size, load_tokenizer, model_info, prefix_token_count
from fineweb_modal.storage import atomic_path, decoding, parquet_key_values, parquet_num_rows, recorded_chunk_config

if TYPE_CHECKING:  # the engine and its benchmark also run where pydantic is not installed (the GPU image)
    from types import ModuleType

    import torch

    from fineweb_modal.config import EmbedConfig
    from fineweb_modal.tei import TEIStats

log = logging.getLogger(__name__)

READ_BLOCK_ROWS = 2048  # rows per part; ~1 M tokens of 500-token chunks, so the 2-3 blocks in flight stay small
CPU_BATCH_TOKENS = 4096  # padded tokens: one batch's activations stay in cache (measured 1.15x faster than 16 k)
CPU_HALF_MIN_COSINE = 0.9999  # fp16 or bf16 on CPU is used only when its vectors agree with fp32's this closely
FIRST_PIECE_ROWS = 128  # the first block runs in pieces of 128, 256, 512, … rows: the model starts early
GPU_BATCH_TOKENS = 65_536  # real tokens per packed batch: enough rows to fill an H100
KEY_COLUMNS = ("id", "doc_index", "chunk_index")


# Texts of different lengths, one of a few hundred tokens: what the engine's start-up checks compare.
AGREEMENT_TEXTS = [
    "a short one",
    "a somewhat longer text, to make the lengths differ within the batch",
    "three",
    " ".join(
        f"Paragraph {i}: the committee reviewed {i * 7} proposals on water, soil and energy, and asked for "
        "measured results before the next season's budget was approved."
        for i in range(8)
    ),
]


class Engine(Protocol):
    """What embed_shard needs from an engine: `prepare` (CPU work, may run in a helper thread) then `run`."""

    dims: int
    tokens_embedded: int

    def prepare(self, texts: list[str], token_counts: list[int] | None = None, row_names: list[str] | None = None) -> object:
        """Tokenizes and batches a block of texts on the CPU; what it returns goes to `run`."""

    def run(self, prepared: object) -> np.ndarray:
        """Embeds a prepared block: one float32 row per text, in the order given."""

    def metadata(self) -> dict[str, str]:
        """What the embedding parquet records about the model and engine: model, revision, pooling, engine."""


@dataclass
class PreparedBlock:
    """One block of texts tokenized and cut into model batches, ready to go to the device."""

    rows: int
    tokens: int
    batches: list[dict]  # model inputs per batch (CPU tensors, pinned when the engine runs on CUDA)
    order: np.ndarray | None  # the texts' rows in the order the batches hold them; None: as given


class TransformersEngine:
    """A transformers encoder with sentence-transformers pooling and normalization, fed token-budget batches.

    `attention="packed"` concatenates a batch's sequences into one row (varlen flash attention on CUDA: no
    padding computed); `"padded"` sorts by length and pads each batch to its longest. `"auto"` packs on
    CUDA when torch has `varlen_attn` and the model takes it, else pads. `compile` wraps the model in
    `torch.compile` (default: on CUDA, where it measured 1.33× eager; a compile failure falls back to eager). `model` replaces loading the weights from `model_id` (benchmarks use random weights of
    another architecture); the tokenizer, limit and pooling still come from `model_id`.

    `freeze` compiles with inductor's freezing: weights become constants; on CUDA q/k/v and SwiGLU's
    gate/up then each run as one matmul, on the CPU weights are prepacked for oneDNN (there 1.03× eager in
    bf16, 1.9× in fp32). Default: when compiling on the CPU; off on CUDA, where it measured 1.003× the
    unfrozen compiled model on an H200 (within noise: cuBLAS runs the separate matmuls as fast).
    `fused_swiglu` (off by default; for `benchmarks/embed.py`) runs each SwiGLU feed-forward's gate and up
    projections in one Triton kernel (`fineweb_modal.kernels`; CUDA, or Triton's interpreter in tests); it
    measured 0.97× on an H200: Triton's matmul is slower than cuBLAS's by more than the pass it saves. It
    changes `model` in place. `compile_mode` is torch.compile's `mode` (`max-autotune-no-cudagraphs`, which
    tries Triton matmul templates against cuBLAS, measured 1.00× on an H200: cuBLAS won every shape).
    `rotary_table` (on) looks a rotary model's cos/sin up in a table computed once (`fineweb_modal.rotary`;
    nomic's shape compiled on an H200: 1.043× the model computing them per call); it too changes `model` in place.
    `attention_kernel` picks packed attention's CUDA kernel: `flash` (torch's `varlen_attn`, FlashAttention-2)
    or `cudnn` (cuDNN's fused attention on ragged sequences; `fineweb_modal.attention`; each packed batch is
    then padded to the budget's width, since cuDNN's plans are cached per shape). Not yet timed on a GPU.
    """

    def __init__(
        self,
        model_id: str,
        prefix: str = "",
        batch_tokens: int | None = None,
        device: str | None = None,
        dimensions: int | None = None,
        model=None,
        attention: str = "auto",
        compile: bool | None = None,
        dtype=None,
        freeze: bool | None = None,
        fused_swiglu: bool = False,
        compile_mode: str | None = None,
        rotary_table: bool = True,
        attention_kernel: str = "flash",
    ):
        import torch

        from fineweb_modal import attention as packed

        self.info: ModelInfo = model_info(model_id)
        self.prefix = prefix
        self.tokenizer = load_tokenizer(self.info.path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = self.device.type == "cuda"
        compiled = compile if compile is not None else on_gpu
        if freeze and not compiled:
            raise ConfigError("freeze=True needs compile: freezing is a torch.compile (inductor) pass")
        self.freeze = compiled and (freeze if freeze is not None else not on_gpu)
        kernels = self._kernels_for_fused_swiglu() if fused_swiglu else None  # before the weights load
        self.compiled = False  # until the end: the start-up checks run the model eagerly
        self.compile_mode = compile_mode
        self.rotary_table = rotary_table
        if attention_kernel not in PACKED_KERNELS:
            raise ConfigError(f"attention_kernel must be one of {', '.join(PACKED_KERNELS)}, got {attention_kernel!r}")
        self.attention_kernel = attention_kernel
        if attention_kernel == "cudnn" and on_gpu and not packed.cudnn_attention_available():
            raise ConfigError("attention_kernel='cudnn' needs torch built with cuDNN's attention (torch.ops.aten._cudnn_attention_forward)")
        self.batch_tokens = batch_tokens or (GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS)
        self.dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        self.weights_from_path = model is None
        self.model = self._load_model(self.dtype) if model is None else model.to(self.device).eval()
        self._tabulate_rotary()
        hidden = int(self.model.config.hidden_size)
        check_dimensions(model_id, dimensions, hidden)
        self.dims = dimensions or hidden
        automatic = attention == "auto"
        if automatic:
            attention = "packed" if self._packing_preferred(on_gpu) else "padded"
        if attention not in ("packed", "padded"):
            raise ConfigError(f"attention must be auto, packed or padded, got {attention!r}")
        current = self.model.config._attn_implementation
        self.padded_attention = "sdpa" if current in PACKED_KERNELS.values() else current  # a model shared with a packed engine
        if attention == "packed":
            packed.register()
        self._set_attention(attention)
        self.forward = self.model
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.tokens_embedded = 0  # real tokens (prefix and special tokens included), for throughput figures
        if attention == "packed":
            try:
                self._check_packing()
            except Exception as exc:
                if not automatic:
                    raise
                # Causal decoders, position ids offset by a padding index (RoBERTa), attention outside
                # transformers' interface (MPNet): packing would change the vectors. Pad instead.
                log.warning("%s: packed attention does not fit this model (%s); using padded batches", model_id, exc)
                self._set_attention("padded")
                self.tokens_embedded = 0
        if dtype is None and self.weights_from_path and not on_gpu and (half := cpu_half_dtype()) is not None:
            self._try_half_precision(half)
        if kernels is not None:
            try:
                fused = kernels.fuse_swiglu(self.model)
            except ValueError as exc:  # a hidden size or dtype the kernel does not take
                raise ConfigError(f"fused_swiglu: {exc}") from exc
            if not fused:
                raise ConfigError(f"fused_swiglu: {model_id} has no SwiGLU feed-forward (gate_proj, up_proj, down_proj, SiLU, no biases)")
        self.compiled = compiled  # False again if compiling fails
        if compiled:
            self.forward = torch.compile(self.model, mode=compile_mode)

    def _kernels_for_fused_swiglu(self) -> ModuleType:
        """fineweb_modal.kernels, where it can run: triton installed, and a CUDA device (or Triton's interpreter)."""
        try:
            from fineweb_modal import kernels
        except ImportError as exc:
            raise ConfigError(f"fused_swiglu needs triton (CUDA builds of torch bring it): {exc}") from exc
        if self.device.type != "cuda" and not kernels.INTERPRETED:
            raise ConfigError("fused_swiglu runs a Triton kernel: it needs a CUDA device (or TRITON_INTERPRET=1, for tests)")
        return kernels

    def _packing_preferred(self, on_gpu: bool) -> bool:
        from fineweb_modal import attention as packed

        return on_gpu and packed.varlen_available() and packed.supports_packing(self.model)

    def metadata(self) -> dict[str, str]:
        """What the embedding parquet records about the model that made it."""
        return {"model": self.info.model_id, "revision": _revision(self.info.path), "pooling": self.info.pooling, "engine": "transformers"}

    def embed(self, texts: list[str], token_counts: list[int] | None = None, row_names: list[str] | None = None) -> np.ndarray:
        """Embed texts (the prefix is added here) into an (n, dims) float32 array in the given order."""
        return self.run(self.prepare(texts, token_counts, row_names))

    def prepare(self, texts: list[str], token_counts: list[int] | None = None, row_names: list[str] | None = None) -> PreparedBlock:
        """Tokenize (with the prefix), check the model's limit and cut the block into batches; no device work."""
        encodings = encode_for_model(self.tokenizer, [self.prefix + t for t in texts])
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))  # no padding: len is the ids'
        too_long = np.flatnonzero(lengths > self.info.sequence_limit)
        if too_long.size:
            row = int(too_long[0])
            name = row_names[row] if row_names else f"row {row}"
            raise BadDataError(
                f"chunk {name} has {lengths[row]} tokens with the prefix, over {self.info.model_id}'s limit of "
                f"{self.info.sequence_limit}: it was chunked for another model or max_tokens"
            )
        if self.attention == "packed":
            batches, order = self._packed_batches(encodings, lengths), None
        else:
            order = np.argsort(-lengths, kind="stable")
            batches = self._padded_batches(encodings, lengths, order)
        if self.device.type == "cuda":
            batches = [{k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in b.items()} for b in batches]
        return PreparedBlock(rows=len(texts), tokens=int(lengths.sum()), batches=batches, order=order)

    def run(self, prepared: PreparedBlock) -> np.ndarray:
        """Run a prepared block through the model: (rows, dims) float32, rows in the texts' order."""
        import torch

        pooled = []
        with torch.inference_mode():
            for batch in prepared.batches:
                # A block of a CPU run takes a minute or more: a stop request (Ctrl-C) is heard per batch.
                raise_if_stop_requested("embedding a block")
                inputs = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                segments = inputs.pop("segments", None)
                lengths = inputs.pop("lengths", None)
                tokens = inputs.pop("tokens", None)
                hidden = self._forward(inputs).last_hidden_state
                if self.attention == "packed":
                    pooled.append(self._pool_packed(hidden[0, :tokens], inputs["cu_seq_lens_q"], segments, lengths))
                else:
                    pooled.append(self._pool(hidden, inputs["attention_mask"]))
            # One device→host copy per block, not one per batch: the GPU never waits for the host.
            vectors = torch.cat(pooled).cpu().numpy() if pooled else np.zeros((0, self.dims), np.float32)
        if self.dtype != torch.float32 and self.device.type == "cpu" and not np.isfinite(vectors).all():
            # fp16's range is small: a text whose activations overflow gets the fp32 model, from then on.
            log.warning("%s: %s overflowed on this block; switching to fp32", self.info.model_id, _short_name(self.dtype))
            self._use_float32()
            return self.run(prepared)
        self.tokens_embedded += prepared.tokens
        if prepared.order is None:
            return vectors
        out = np.empty((prepared.rows, self.dims), dtype=np.float32)
        out[prepared.order] = vectors
        return out

    def _forward(self, inputs: dict):
        """The model on one batch; a compiled model that fails is replaced by the eager one, once, with a warning."""
        import torch

        try:
            if self.freeze and self.forward is not self.model:
                import torch._inductor.config

                # Around every call, not only the first: a new batch shape recompiles, and must freeze too.
                # (torch.compile's `options` do not reach the freezing pass.) Freezing needs grad off.
                with torch._inductor.config.patch(freezing=True):
                    return self.forward(**inputs)
            return self.forward(**inputs)
        except Exception as exc:
            if self.forward is self.model or isinstance(exc, torch.OutOfMemoryError):
                raise
            log.warning("torch.compile failed (%s: %s); running the model eagerly", type(exc).__name__, exc)
            self.forward = self.model
            self.compiled = False
            return self.model(**inputs)

    def _padded_batches(self, encodings, lengths: np.ndarray, order: np.ndarray) -> list[dict]:
        """Length-sorted batches filled to `batch_tokens` padded tokens."""
        import torch

        batches, start = [], 0
        while start < len(order):
            longest = int(lengths[order[start]])
            rows = order[start : start + max(1, self.batch_tokens // max(longest, 1))]
            ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), longest), dtype=np.int64)
            for row, index in enumerate(rows):
                token_ids = encodings[index].ids
                ids[row, : len(token_ids)] = token_ids
                mask[row, : len(token_ids)] = 1
            batches.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
            start += len(rows)
        return batches

    def _packed_batches(self, encodings, lengths: np.ndarray) -> list[dict]:
        """Consecutive rows concatenated into one sequence per batch, at most `batch_tokens` real tokens each."""
        import torch

        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=int(lengths.sum()))
        ends = np.cumsum(lengths)
        batches, row, token = [], 0, 0
        while row < len(lengths):
            # The last row whose end stays within the budget (at least one row: a row never exceeds the model limit).
            stop = max(row + 1, int(np.searchsorted(ends, token + self.batch_tokens, side="right")))
            seq_lengths = lengths[row:stop]
            cu = np.zeros(len(seq_lengths) + 1, dtype=np.int32)
            np.cumsum(seq_lengths, out=cu[1:])
            total = int(cu[-1])
            positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), seq_lengths)
            ids = flat[token : token + total]
            longest = -(-int(seq_lengths.max()) // 64) * 64  # an upper bound is enough; few distinct values, few recompiles
            width = total
            if self.attention_kernel == "cudnn":
                # cuDNN caches an execution plan per q/k/v shape: every batch gets the same token count (a tail
                # of padding outside every sequence: not attended, not pooled), so the plans are per number of
                # sequences and longest length only. Batches fill their budget to within a sequence: little waste.
                width = -(-total // self.batch_tokens) * self.batch_tokens
                ids = np.concatenate([ids, np.full(width - total, self.pad_id, dtype=np.int64)])
                positions = np.concatenate([positions, np.zeros(width - total, dtype=np.int64)])
            cu_tensor = torch.from_numpy(cu)
            batches.append(
                {
                    "input_ids": torch.from_numpy(ids).unsqueeze(0),
                    "position_ids": torch.from_numpy(positions).unsqueeze(0),
                    "token_type_ids": torch.zeros((1, width), dtype=torch.int64),
                    "cu_seq_lens_q": cu_tensor,
                    "cu_seq_lens_k": cu_tensor,
                    "max_length_q": longest,
                    "max_length_k": longest,
                    "segments": torch.from_numpy(np.repeat(np.arange(len(seq_lengths)), seq_lengths)),
                    "lengths": torch.from_numpy(seq_lengths),
                    "tokens": total,
                }
            )
            row, token = stop, token + total
        return batches

    def _pool_packed(self, hidden, cu, segments, lengths):
        """Pool a packed (tokens, hidden) output per sequence."""
        import torch

        if self.info.pooling == "cls":
            pooled = hidden[cu[:-1].long()].float()
        elif self.info.pooling == "last":
            pooled = hidden[cu[1:].long() - 1].float()
        else:
            sums = torch.zeros((len(lengths), hidden.shape[-1]), dtype=torch.float32, device=hidden.device)
            pooled = sums.index_add_(0, segments, hidden.float()) / lengths.unsqueeze(1).to(torch.float32)
        return self._finish(pooled)

    def _pool(self, hidden, attention):
        import torch

        hidden = hidden.float()  # sums over hundreds of fp16 values lose precision
        if self.info.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.info.pooling == "last":
            last = attention.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = attention.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return self._finish(pooled)

    def _finish(self, pooled):
        import torch

        pooled = pooled[:, : self.dims]  # Matryoshka models: keep the leading dims, then renormalize
        # Always unit length, whether or not the model's pipeline ends in Normalize (nomic's does not): the
        # stored vectors promise it, and TEI is asked for the same (`normalize: true`).
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def _load_model(self, dtype):
        """The weights from the model's folder in `dtype`, on this engine's device, in eval mode."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.info.path, dtype=dtype, attn_implementation="sdpa").to(self.device).eval()

    def _tabulate_rotary(self) -> None:
        """Rotary models (nomic): cos/sin looked up in a table of every position the model's limit allows (`rotary_table`)."""
        from fineweb_modal.rotary import tabulate_rotary

        if self.rotary_table:
            positions = max(int(getattr(self.model.config, "max_position_embeddings", 0) or 0), self.info.sequence_limit)
            if replaced := tabulate_rotary(self.model, positions):
                log.info("%s: %d rotary embedding(s) now looked up in a table of %d positions", self.info.model_id, replaced, positions)

    def _set_attention(self, attention: str) -> None:
        """Switch between packed (varlen) and padded batches; the model's attention implementation follows."""
        self.attention = attention
        self.model.set_attn_implementation(PACKED_KERNELS[self.attention_kernel] if attention == "packed" else self.padded_attention)

    def _agreement(self, switch: Callable[[], None]) -> float:
        """The lowest cosine between a few texts' vectors before and after `switch()` changes how the engine runs."""
        texts = self._agreement_texts()
        before = self.embed(texts)
        switch()
        after = self.embed(texts)
        self.tokens_embedded = 0  # start-up checks are not throughput
        return float(np.nan_to_num((before * after).sum(axis=1), nan=-1.0).min())

    def _try_half_precision(self, half: torch.dtype) -> None:
        """Run the model in `half` (fp16 or bf16) if a few texts' vectors agree with fp32's (cosine ≥ CPU_HALF_MIN_COSINE)."""

        def to_half() -> None:
            self.model.to(half)
            self.dtype = half

        agreement = self._agreement(to_half)
        if agreement < CPU_HALF_MIN_COSINE:
            log.warning("%s: %s vectors disagree with fp32 (cosine %.5f); using fp32", self.info.model_id, _short_name(half), agreement)
            self._use_float32()

    def _agreement_texts(self) -> list[str]:
        """AGREEMENT_TEXTS that fit this model's limit with the prefix."""
        fits = [len(e) <= self.info.sequence_limit for e in encode_for_model(self.tokenizer, [self.prefix + t for t in AGREEMENT_TEXTS])]
        return [text for text, fit in zip(AGREEMENT_TEXTS, fits) if fit]

    def _use_float32(self) -> None:
        """Reload the weights in fp32 (converting fp16 weights back would keep their rounding); a given model is converted."""
        import torch

        if self.weights_from_path:
            self.model = self._load_model(torch.float32)
            self._tabulate_rotary()
            self._set_attention(self.attention)
        else:
            self.model.float()
        # A compiled engine stays compiled: `--compile on` measured ~2× eager in fp32 on the CPU.
        self.forward = torch.compile(self.model, mode=self.compile_mode) if self.compiled else self.model
        self.dtype = torch.float32

    def _check_packing(self) -> None:
        """Packed and padded runs of a few texts must agree, or the model ignored the packed attention."""
        try:
            agreement = self._agreement(lambda: self._set_attention("padded"))
        finally:
            self._set_attention("packed")
        if agreement < 0.99:
            raise ConfigError(f"packed attention disagrees with padded for {self.info.model_id} (cosine {agreement:.4f}); use attention='padded'")


def cpu_half_dtype() -> torch.dtype | None:
    """The 16-bit float this CPU multiplies natively, or None (emulated, either is slower than fp32)."""
    import torch

    # AMX first (its bf16 tiles are many times AVX-512's rate; Sapphire Rapids has AMX-BF16 and AVX512-FP16 but
    # no AMX-FP16), then AVX-512; fp16 before bf16 at the same level, its mantissa being 3 bits longer.
    checks = (
        (lambda: torch.cpu._is_amx_fp16_supported(), torch.float16),
        (lambda: torch.cpu._is_amx_tile_supported(), torch.bfloat16),
        (lambda: torch.ops.mkldnn._is_mkldnn_fp16_supported(), torch.float16),  # AVX512-FP16
        (lambda: torch.cpu._is_avx512_bf16_supported(), torch.bfloat16),
    )
    for supported, dtype in checks:
        try:  # private checks: absent from some torch builds
            if supported():
                return dtype
        except (AttributeError, RuntimeError):
            continue
    return None


def _short_name(dtype) -> str:
    """fp16, bf16, fp32: how warnings name a torch dtype."""
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(str(dtype).removeprefix("torch."), str(dtype))


class TEIEngine:
    """Embeds through a TEI server: real token counts for packing come from the chunk file, not a tokenizer pass."""

    def __init__(self, url: str, model_id: str, prefix: str = "", dimensions: int | None = None, served_as: str | None = None):
        from fineweb_modal.tei import TEIClient, check_served_model

        self.client = TEIClient(url, api_key=os.environ.get("TEI_API_KEY") or None)
        self.server = asyncio.run(self.client.info())
        check_served_model(self.server, model_id, served_as)
        self.model_id, self.prefix, self.dimensions = model_id, prefix, dimensions
        self.model_path = model_info(model_id).path
        check_dimensions(model_id, dimensions, hidden_size(self.model_path))  # else TEI finds out after computing a batch
        self.prefix_tokens = prefix_token_count(self.model_path, prefix)
        self._dims = dimensions or 0  # else learnt from the first answer
        self.tokens_embedded = 0

    @property
    def dims(self) -> int:
        """The vectors' width: as asked, else as served (one tiny request when no answer came yet: a shard with
        no chunk still gets its siblings' vector type)."""
        if not self._dims:
            before = self.tokens_embedded
            self.run(self.prepare(["."]))
            self.tokens_embedded = before
        return self._dims

    def take_request_stats(self) -> TEIStats:
        """The client's request counts since the last take (so, taken around a shard: that shard's), counting afresh."""
        from fineweb_modal.tei import TEIStats

        taken, self.client.stats = self.client.stats, TEIStats()
        return taken

    def metadata(self) -> dict[str, str]:
        """What the embedding parquet records about the served model."""
        return {
            "model": self.model_id,
            "revision": self.server.model_sha or "unknown",
            "pooling": self.server.model_pooling or "unknown",
            "engine": f"tei {self.server.version or ''}".strip(),
            "served_model": self.server.model_id,
        }

    def embed(self, texts: list[str], token_counts: list[int] | None = None, row_names: list[str] | None = None) -> np.ndarray:
        """Embed texts through TEI; `token_counts` are the chunks' own ([CLS]/[SEP] included), the prefix is added here."""
        return self.run(self.prepare(texts, token_counts, row_names))

    def prepare(self, texts: list[str], token_counts: list[int] | None = None, row_names: list[str] | None = None) -> tuple:
        """Add the prefix and count each input's real tokens (from the chunk file when it has them)."""
        if token_counts is None:
            token_counts = [len(e) for e in encode_for_model(load_tokenizer(self.model_path), texts)]
        counts = [n + self.prefix_tokens for n in token_counts]
        inputs = [self.prefix + t for t in texts] if self.prefix else texts
        return inputs, counts, row_names

    def run(self, prepared: tuple) -> np.ndarray:
        """Send prepared inputs to TEI, several requests in flight; rows come back in the given order."""
        inputs, counts, row_names = prepared
        vectors = asyncio.run(self.client.embed(inputs, counts, self.server, self.dimensions, row_names))
        self._dims = vectors.shape[1] if len(vectors) else self._dims
        self.tokens_embedded += sum(counts)
        return vectors


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead of the consumer; stops when the consumer does."""
    import queue
    import threading

    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    failure: list[BaseException] = []
    stopped = threading.Event()

    def offer(item) -> bool:
        while not stopped.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as exc:  # handed to the consumer: a silent stop would drop rows
            failure.append(exc)
        offer(done)

    thread = threading.Thread(target=produce, daemon=True, name="embed-prefetch")
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            yield item
    finally:
        stopped.set()
        thread.join(timeout=5)
    if failure:
        raise failure[0]


def get_engine(cfg: EmbedConfig) -> Engine:
    """One engine per process and config (a Modal container or a local worker serves many shards)."""
    # A TEI engine holds its API key: a rotated key (a new TEI_API_KEY) gets a new engine, never a stale one.
    key = os.environ.get("TEI_API_KEY", "") if cfg.engine == "tei" else ""
    return _cached_engine(cfg, hashlib.sha256(key.encode()).hexdigest())


@functools.lru_cache(maxsize=2)
def _cached_engine(cfg: EmbedConfig, api_key_digest: str) -> Engine:
    if cfg.engine == "tei":
        if not cfg.tei_url:
            raise ConfigError("the tei engine needs tei_url")
        return TEIEngine(cfg.tei_url, cfg.model, prefix=cfg.prefix, dimensions=cfg.dimensions, served_as=cfg.tei_served_model)
    compile = {"auto": None, "on": True, "off": False}[cfg.compile]
    return TransformersEngine(cfg.model, prefix=cfg.prefix, batch_tokens=cfg.batch_tokens, dimensions=cfg.dimensions, compile=compile)


@dataclass
class EmbedStats:
    """Counts for one embedded shard."""

    chunks: int = 0
    tokens: int = 0
    dims: int = 0
    docs: int = 0  # as the chunk file counted them (0 when it does not say)
    tei_requests: dict | None = None  # the TEI engine's requests, retries and statuses for this shard


def _revision(path: str) -> str:
    config = Path(path) / "config.json"
    payload = json.loads(config.read_text()) if config.is_file() else {}
    # A Hub snapshot folder is named by its commit; a bundled or local folder has no revision.
    parent = Path(path).parent.name
    return payload.get("_commit_hash") or (Path(path).name if parent == "snapshots" else "local")


def _piece_bounds(rows: int, first: bool) -> list[tuple[int, int]]:
    """Row ranges a block is prepared and run in: the whole block, or for the first block pieces doubling from FIRST_PIECE_ROWS."""
    if not first:
        return [(0, rows)]
    bounds, start, size = [], 0, FIRST_PIECE_ROWS
    while start < rows:
        bounds.append((start, min(rows, start + size)))
        start, size = start + size, size * 2
    return bounds


class _ShardOutput:
    """The shard's one embedding parquet, appended to as each part is written: no pass over all parts at the end."""

    def __init__(self, path: Path, value_type: pa.DataType, metadata: dict[str, str]):
        self.path, self.value_type, self.metadata = path, value_type, metadata
        self.writer: pq.ParquetWriter | None = None
        self.dims = 0

    def append(self, table: pa.Table) -> None:
        """Add a part's rows (keys and embedding) after the rows appended before."""
        if self.writer is None:
            self._open(table.schema.field("embedding").type.list_size)
        self.writer.write_table(table.cast(self.schema))

    def close(self, dims_if_empty: int) -> int:
        """Finish the file (an empty one with `dims_if_empty` when no part came); the vectors' width."""
        if self.writer is None:
            self._open(dims_if_empty)
        self.writer.close()
        return self.dims

    def discard(self) -> None:
        """Let go of the file after a failure (its temp path is removed by the caller); never masks that failure."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()

    def _open(self, dims: int) -> None:
        self.dims = dims
        metadata = {**self.metadata, "dims": str(dims)}
        self.schema = pa.schema(
            [
                pa.field("id", pa.string()),
                pa.field("doc_index", pa.int64()),
                pa.field("chunk_index", pa.int32()),
                pa.field("embedding", pa.list_(self.value_type, dims)),
            ],
            metadata={f"fineweb_modal.{k}".encode(): v.encode() for k, v in metadata.items()},
        )
        # Unique ids and float vectors (97-99 % of the bytes): dictionaries and compression save next to nothing,
        # and their per-part buffers raised the stage's peak memory with the shard's length (measured +15 MB at 100 k chunks).
        self.writer = pq.ParquetWriter(self.path, self.schema, use_dictionary=False, compression="none")


def _part_config(part: Path) -> str | None:
    try:
        return parquet_key_values(pq.ParquetFile(part)).get("fineweb_modal.part_config")
    except (OSError, pa.ArrowInvalid):
        return None


def _check_cut_for(chunks: pq.ParquetFile, input_path: Path, model: str) -> None:
    """Chunks cut with another tokenizer than the model's own: their token counts (and fit) are not this model's."""
    cut_with = recorded_chunk_config(chunks.schema_arrow)  # {} for a chunk file from elsewhere: nothing to compare
    if cut_with.get("tokenizer_sha256") not in (None, model_info(model).tokenizer_sha256):
        raise BadDataError(
            f"{input_path}: cut with {cut_with.get('model')}'s tokenizer, not {model}'s; chunk it again with --model {model} "
            f"(the pipeline does) or embed it with --model {cut_with.get('model')}"
        )


def embed_shard(input_path: Path, output_path: Path, cfg: EmbedConfig, parts_dir: Path, engine: Engine | None = None) -> EmbedStats:
    """Embed one chunk parquet into one embedding parquet (same row order), part by part, resuming after the last whole part.

    Three stages overlap: a helper thread reads and tokenizes ahead while the model runs, and another writes
    each finished part and appends it to the output. The first block is cut into small pieces so the model
    starts after a few hundred rows are tokenized. `engine` replaces the configured one (benchmarks).
    """
    pin_mmap_threshold()
    with decoding(input_path, "read as a chunk parquet"):
        chunks = pq.ParquetFile(input_path)
    if engine is None:  # the configured model's (a given engine is the caller's choice, e.g. a benchmark's)
        _check_cut_for(chunks, input_path, cfg.model)
        engine = get_engine(cfg)
    missing = [c for c in (*KEY_COLUMNS, "chunk_text") if c not in chunks.schema_arrow.names]
    if missing:
        raise BadDataError(f"{input_path}: missing column(s) {missing}; is it a chunk file?")
    has_counts = "chunk_token_count" in chunks.schema_arrow.names
    columns = [*KEY_COLUMNS, "chunk_text", *(["chunk_token_count"] if has_counts else [])]
    value_type = pa.float16() if cfg.embedding_dtype == "float16" else pa.float32()
    parts_dir.mkdir(parents=True, exist_ok=True)
    for stale in parts_dir.glob(".*.tmp"):  # a part a killed run was writing
        stale.unlink(missing_ok=True)
    stats = EmbedStats(docs=int(parquet_key_values(chunks).get("fineweb_modal.docs", 0)))
    if isinstance(engine, TEIEngine):
        engine.take_request_stats()  # what came before this shard is not its

    def prepare(piece: pa.RecordBatch) -> object:
        if piece.column("chunk_text").null_count:
            row = pc.index(pc.is_null(piece.column("chunk_text")), True).as_py()
            key = (piece.column("doc_index")[row].as_py(), piece.column("chunk_index")[row].as_py())
            raise BadDataError(f"{input_path}: chunk (doc_index={key[0]}, chunk_index={key[1]}) has no chunk_text (null)")
        texts = piece.column("chunk_text").to_pylist()
        counts = piece.column("chunk_token_count").to_pylist() if has_counts else None
        names = [f"(doc_index={d}, chunk_index={c})" for d, c in zip(piece.column("doc_index").to_pylist(), piece.column("chunk_index").to_pylist())]
        return engine.prepare(texts, counts, names)

    def pieces() -> Iterator[tuple[pa.RecordBatch, Path, object | None, bool]]:
        """(block, its part file, one prepared piece of it — None for a part embedded before —, whether the piece ends the block)."""
        first = True
        for index, block in enumerate(chunks.iter_batches(batch_size=READ_BLOCK_ROWS, columns=columns)):
            part = parts_dir / f"part-{index:05d}.parquet"
            if parquet_num_rows(part) == block.num_rows and _part_config(part) == part_config:  # embedded before the last interruption
                yield block, part, None, True
                continue
            for start, stop in _piece_bounds(block.num_rows, first):
                yield block, part, prepare(block.slice(start, stop - start)), stop == block.num_rows
            first = False

    def write_part(block: pa.RecordBatch, part: Path, vectors: np.ndarray, tokens: int) -> None:
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).astype(value_type.to_pandas_dtype())), vectors.shape[1])
        table = pa.Table.from_arrays([*(block.column(c) for c in KEY_COLUMNS), embedding], names=[*KEY_COLUMNS, "embedding"])
        with atomic_path(part) as tmp:
            metadata = {"fineweb_modal.tokens": str(tokens), "fineweb_modal.part_config": part_config}
            pq.write_table(table.replace_schema_metadata(metadata), tmp, compression="none")
        output.append(table)

    metadata = {**engine.metadata(), "prefix": cfg.prefix, "dtype": cfg.embedding_dtype, "normalized": "true"}
    # A part is reused only when made the same way (the pipeline's parts folder is per config already; this
    # guards direct callers, and a model changed under the same id).
    part_config = json.dumps({**metadata, "dimensions": cfg.dimensions}, sort_keys=True)  # not engine.dims: TEI learns it
    with atomic_path(output_path) as tmp:
        output = _ShardOutput(tmp, value_type, metadata)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-writer") as writer:
                pending: list[Future] = []
                block_vectors: list[np.ndarray] = []
                block_tokens = 0
                for block, part, prepared, ends_block in _prefetch(pieces(), depth=1):
                    raise_if_stop_requested(f"embedding {input_path.name}")  # the parts written so far stay
                    if prepared is None:
                        stats.tokens += int(parquet_key_values(pq.ParquetFile(part)).get("fineweb_modal.tokens", 0))
                        pending.append(writer.submit(lambda part=part: output.append(pq.read_table(part))))
                    else:
                        before = engine.tokens_embedded
                        block_vectors.append(engine.run(prepared))
                        block_tokens += engine.tokens_embedded - before
                        if not ends_block:
                            continue
                        vectors = block_vectors[0] if len(block_vectors) == 1 else np.concatenate(block_vectors)
                        pending.append(writer.submit(write_part, block, part, vectors, block_tokens))
                        stats.tokens += block_tokens
                        block_vectors, block_tokens = [], 0
                    stats.chunks += block.num_rows
                    if len(pending) > 1:  # at most one part waits to be written: memory stays bounded by two blocks
                        pending.pop(0).result()
                for future in pending:
                    future.result()
        except BaseException:
            output.discard()
            raise
        stats.dims = output.close(engine.dims)
    shutil.rmtree(parts_dir, ignore_errors=True)
    if isinstance(engine, TEIEngine):
        requests = engine.take_request_stats()
        stats.tei_requests = asdict(requests)
        if retried := requests.retried():
            # Every row still came back once; many retries say the server is overloaded or restarting.
            log.warning("%s: TEI at %s: %s", input_path.name, engine.client.url, retried)
    return stats
