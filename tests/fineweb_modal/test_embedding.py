"""The in-process engine gives sentence-transformers' vectors, in the chunk file's row order."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fineweb_modal.config import EmbedConfig
from fineweb_modal.embedding import TransformersEngine, embed_shard, get_engine
from fineweb_modal.errors import BadDataError, ConfigError
from fineweb_modal.models import DEFAULT_MODEL, model_info

TEXTS = [
    "A short sentence.",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Unicode: café, naïve, 中文, emoji 😀.",
    "x",
    "Python's `for` statement iterates over the items of any sequence, in the order that they appear.",
]


@contextlib.contextmanager
def logs_warning(caplog, pattern: str):
    """The block logs a warning matching `pattern` (logged, so a shard's task run shows it in Prefect)."""
    with caplog.at_level(logging.WARNING, logger="fineweb_modal"):
        yield
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("fineweb_modal")]
    assert any(re.search(pattern, message) for message in warned), warned


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_info(DEFAULT_MODEL).path, device="cpu")


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers(sentence_transformer):
    ours = get_engine(EmbedConfig(model=DEFAULT_MODEL, batch_tokens=512)).embed(TEXTS)  # a small budget: several batches of mixed lengths
    reference = sentence_transformer.encode(TEXTS, normalize_embeddings=True)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert cosine_rows(ours, reference).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_prefix_is_embedded_with_the_text(sentence_transformer):
    prefix = "search_document: "
    ours = TransformersEngine(DEFAULT_MODEL, prefix=prefix).embed(TEXTS[:2])
    reference = sentence_transformer.encode([prefix + t for t in TEXTS[:2]], normalize_embeddings=True)
    plain = sentence_transformer.encode(TEXTS[:2], normalize_embeddings=True)
    assert cosine_rows(ours, reference).min() >= 0.999
    assert cosine_rows(ours, plain).max() < 0.999


def test_chunk_over_the_model_limit_is_reported():
    with pytest.raises(BadDataError, match="chunk row 1 has 402 tokens"):
        get_engine(EmbedConfig(model=DEFAULT_MODEL)).embed(["fine", "word " * 400])


def test_embed_shard_keeps_row_order_and_records_metadata(tmp_path, sentence_transformer):
    texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(23)]
    chunks = pa.table(
        {
            "id": [f"doc{i // 3}" for i in range(23)],
            "doc_index": pa.array([i // 3 for i in range(23)], pa.int64()),
            "chunk_index": pa.array([i % 3 for i in range(23)], pa.int32()),
            "chunk_text": pa.array(texts, pa.large_string()),
        }
    )
    pq.write_table(chunks, tmp_path / "c.parquet")
    stats = embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", EmbedConfig(model=DEFAULT_MODEL, batch_tokens=256), tmp_path / "parts")
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["id", "doc_index", "chunk_index", "embedding"]
    assert table.column("id").to_pylist() == chunks.column("id").to_pylist()
    assert table.column("chunk_index").to_pylist() == chunks.column("chunk_index").to_pylist()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    reference = sentence_transformer.encode(texts, normalize_embeddings=True)
    assert cosine_rows(vectors, reference).min() >= 0.999
    metadata = table.schema.metadata
    assert metadata[b"fineweb_modal.dims"] == b"384" and metadata[b"fineweb_modal.pooling"] == b"mean"
    assert metadata[b"fineweb_modal.model"] == DEFAULT_MODEL.encode() and metadata[b"fineweb_modal.normalized"] == b"true"
    assert stats.chunks == 23 and stats.tokens > 23 * 3


def test_dimensions_and_float16_storage(tmp_path, sentence_transformer):
    texts = TEXTS * 3
    chunks = pa.table(
        {"id": [str(i) for i in range(15)], "doc_index": pa.array(range(15), pa.int64()), "chunk_index": pa.array([0] * 15, pa.int32()), "chunk_text": texts}
    )
    pq.write_table(chunks, tmp_path / "c.parquet")
    cfg = EmbedConfig(model=DEFAULT_MODEL, dimensions=128, embedding_dtype="float16")
    embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", cfg, tmp_path / "parts")
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 128)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    full = sentence_transformer.encode(texts, normalize_embeddings=True)[:, :128]
    assert cosine_rows(vectors, full).min() >= 0.999
    assert table.schema.metadata[b"fineweb_modal.dtype"] == b"float16"


def write_numbered_chunks(path, n: int) -> pa.Table:
    """A chunk file of `n` one-chunk documents, `text number i`."""
    chunks = pa.table(
        {"id": [str(i) for i in range(n)], "doc_index": pa.array(range(n), pa.int64()), "chunk_index": pa.array([0] * n, pa.int32()),
         "chunk_text": [f"text number {i}" for i in range(n)]}
    )  # fmt: skip
    pq.write_table(chunks, path)
    return chunks


def test_a_null_chunk_text_is_bad_data_naming_the_chunk(tmp_path):
    chunks = pa.table(
        {"id": ["a", "b"], "doc_index": pa.array([0, 1], pa.int64()), "chunk_index": pa.array([0, 3], pa.int32()), "chunk_text": ["fine", None]}
    )
    pq.write_table(chunks, tmp_path / "c.parquet")
    with pytest.raises(BadDataError, match=r"c.parquet: chunk \(doc_index=1, chunk_index=3\) has no chunk_text"):
        embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", EmbedConfig(model=DEFAULT_MODEL), tmp_path / "parts")


def test_a_stop_request_ends_an_embed_shard_within_a_batch_keeping_its_parts(tmp_path, monkeypatch):
    """Ctrl-C on a local run: the shard stops within a batch, writes no output, and the rerun resumes from the parts."""
    import fineweb_modal.embedding as embedding
    from fineweb_modal.errors import Interrupted
    from fineweb_modal.interrupt import request_stop, withdraw_stop

    monkeypatch.setattr(embedding, "READ_BLOCK_ROWS", 4)
    chunks = write_numbered_chunks(tmp_path / "c.parquet", 24)
    engine = get_engine(EmbedConfig(model=DEFAULT_MODEL))
    runs = []

    class StoppedDuringItsThirdRun:  # a test double around the real engine: Ctrl-C arrives while a piece runs
        dims, metadata, prepare = engine.dims, engine.metadata, engine.prepare

        @property
        def tokens_embedded(self) -> int:
            return engine.tokens_embedded

        def run(self, prepared):
            runs.append(prepared.rows)
            if len(runs) == 3:
                request_stop()
            return engine.run(prepared)

    try:
        with pytest.raises(Interrupted, match="stopped on request"):
            embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", EmbedConfig(model=DEFAULT_MODEL), tmp_path / "parts", engine=StoppedDuringItsThirdRun())
    finally:
        withdraw_stop()
    assert len(runs) == 3, "no piece started after the request"
    assert not (tmp_path / "e.parquet").exists()
    assert len(list((tmp_path / "parts").glob("part-*.parquet"))) == 2, "the pieces done are kept; the running one stops at its next batch"
    stats = embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", EmbedConfig(model=DEFAULT_MODEL), tmp_path / "parts")
    table = pq.read_table(tmp_path / "e.parquet")
    assert stats.chunks == table.num_rows == 24 and table.column("id").to_pylist() == chunks.column("id").to_pylist()


def test_parts_made_another_way_are_not_reused(tmp_path, monkeypatch):
    """Parts are matched by how they were made, not by row count alone (a direct caller may reuse a parts folder)."""
    import fineweb_modal.embedding as embedding

    monkeypatch.setattr(embedding, "READ_BLOCK_ROWS", 4)
    n = 8
    write_numbered_chunks(tmp_path / "c.parquet", n)
    embed_shard(tmp_path / "c.parquet", tmp_path / "narrow.parquet", EmbedConfig(model=DEFAULT_MODEL, dimensions=32), tmp_path / "narrow-parts")
    # The narrow run's rows, as parts a killed run would have left, in the parts folder of a full-width run.
    (tmp_path / "parts").mkdir()
    table = pq.read_table(tmp_path / "narrow.parquet")
    for index in range(2):
        piece = table.slice(4 * index, 4)
        metadata = {"fineweb_modal.tokens": "1", "fineweb_modal.part_config": "made another way"}
        pq.write_table(piece.replace_schema_metadata(metadata), tmp_path / "parts" / f"part-{index:05d}.parquet")
    stats = embed_shard(tmp_path / "c.parquet", tmp_path / "full.parquet", EmbedConfig(model=DEFAULT_MODEL), tmp_path / "parts")
    full = pq.read_table(tmp_path / "full.parquet")
    assert stats.dims == 384 and full.schema.field("embedding").type.list_size == 384 and full.num_rows == n


def test_interrupted_shard_resumes_after_the_last_whole_part(tmp_path, monkeypatch):
    import fineweb_modal.embedding as embedding

    monkeypatch.setattr(embedding, "READ_BLOCK_ROWS", 4)
    n = 10
    chunks = write_numbered_chunks(tmp_path / "c.parquet", n)
    cfg = EmbedConfig(model=DEFAULT_MODEL)
    engine = get_engine(cfg)
    calls, preempt = [], [True]
    real_run = engine.run

    def failing_run(prepared):
        calls.append(prepared.rows)
        if len(calls) == 2 and preempt:
            preempt.clear()
            raise ConnectionError("preempted")
        return real_run(prepared)

    monkeypatch.setattr(engine, "run", failing_run)
    with pytest.raises(ConnectionError):
        embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", cfg, tmp_path / "parts")
    assert not (tmp_path / "e.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-00000.parquet"]
    calls.clear()
    stats = embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", cfg, tmp_path / "parts")
    assert calls == [4, 2], "the first part is reused, only the rest is embedded"
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("id").to_pylist() == [str(i) for i in range(n)] and stats.chunks == n
    assert not (tmp_path / "parts").exists()
    reference = engine.embed(chunks.column("chunk_text").to_pylist())
    assert cosine_rows(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), reference).min() > 0.9999


def test_prefetch_keeps_order_and_passes_errors_on():
    from fineweb_modal.embedding import _prefetch

    assert list(_prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("producer broke")

    with pytest.raises(ValueError, match="producer broke"):
        list(_prefetch(failing(), depth=2))


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    import threading

    from fineweb_modal.embedding import _prefetch

    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    stream = _prefetch(endless(), depth=1)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "embed-prefetch"], "the helper thread ended"
    assert len(produced) <= 5, "it stopped producing, not ran on"


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_packed_batches_give_the_padded_vectors(pooling, monkeypatch):
    """The packed path (varlen on CUDA, per-sequence SDPA here) matches the padded one row for row."""
    import dataclasses

    texts = [TEXTS[i % len(TEXTS)] * (1 + i % 2) for i in range(17)]
    import torch

    # fp32: with fp16/bf16 (where the CPU has them) batches of other shapes round differently.
    padded = TransformersEngine(DEFAULT_MODEL, attention="padded", batch_tokens=300, dtype=torch.float32)
    packed = TransformersEngine(DEFAULT_MODEL, attention="packed", batch_tokens=300, dtype=torch.float32)
    padded.info = packed.info = dataclasses.replace(padded.info, pooling=pooling)
    prepared = packed.prepare(texts)
    assert len(prepared.batches) > 2 and all(b["input_ids"].shape[1] <= 300 for b in prepared.batches), "several budget-sized batches"
    assert prepared.order is None, "packed batches keep the rows' order"
    ours, reference = packed.run(prepared), padded.embed(texts)
    assert cosine_rows(ours, reference).min() >= 0.99999
    assert packed.tokens_embedded == padded.tokens_embedded == prepared.tokens


def test_packed_nomic_bert_matches_padded():
    """nomic-embed-text-v1.5's architecture (rotary positions restart per packed sequence), random weights."""
    import torch
    from transformers import NomicBertConfig, NomicBertModel

    torch.manual_seed(0)
    model = NomicBertModel(NomicBertConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4)).eval()
    texts = [TEXTS[i % len(TEXTS)] for i in range(9)]
    packed = TransformersEngine(DEFAULT_MODEL, model=model, attention="packed", batch_tokens=128)
    ours = packed.embed(texts)
    model.set_attn_implementation("sdpa")
    reference = TransformersEngine(DEFAULT_MODEL, model=model, attention="padded").embed(texts)
    assert ours.shape == (9, 128) and cosine_rows(ours, reference).min() >= 0.99999


def test_a_failing_compiled_model_falls_back_to_eager_once(caplog):
    engine = TransformersEngine(DEFAULT_MODEL, compile=False)
    expected = engine.embed(TEXTS)
    calls = []

    def broken_compiled(**inputs):
        calls.append(1)
        raise RuntimeError("inductor could not compile this")

    engine.forward = broken_compiled
    with logs_warning(caplog, "torch.compile failed .*running the model eagerly"):
        vectors = engine.embed(TEXTS)
    assert calls == [1] and engine.forward is engine.model
    assert cosine_rows(vectors, expected).min() >= 0.99999


def test_a_model_that_packing_does_not_fit_is_padded_instead(monkeypatch, caplog):
    """MPNet computes attention outside transformers' interface: packing would mix sequences, so auto pads."""
    import torch
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    model = MPNetModel(MPNetConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2, vocab_size=30527)).eval()
    with pytest.raises(Exception, match="packed attention disagrees with padded"):
        TransformersEngine(DEFAULT_MODEL, model=model, attention="packed")
    monkeypatch.setattr(TransformersEngine, "_packing_preferred", lambda self, on_gpu: True)  # as on a GPU
    with logs_warning(caplog, "packed attention does not fit this model"):
        engine = TransformersEngine(DEFAULT_MODEL, model=model)
    assert engine.attention == "padded"
    reference = TransformersEngine(DEFAULT_MODEL, model=model, attention="padded").embed(TEXTS)
    assert cosine_rows(engine.embed(TEXTS), reference).min() >= 0.99999


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_on_a_cpu_that_multiplies_it_natively(half, monkeypatch, sentence_transformer):
    import torch

    from fineweb_modal import embedding

    half = getattr(torch, half)
    monkeypatch.setattr(embedding, "cpu_half_dtype", lambda: half)  # whatever this machine's CPU
    engine = TransformersEngine(DEFAULT_MODEL, device="cpu")
    assert engine.dtype == half and next(engine.model.parameters()).dtype == half
    vectors = engine.embed(TEXTS)
    assert vectors.dtype == np.float32 and engine.tokens_embedded > 0
    # bf16 keeps 3 fewer mantissa bits than fp16 (~8x the rounding, ~64x the 1 - cos); AMX and AVX-512 also
    # round their sums differently (0.99989 was measured with AMX on a Sapphire Rapids). The product's bar is 0.999.
    floor = {torch.float16: 0.9999, torch.bfloat16: 0.9995}[half]
    assert cosine_rows(vectors, sentence_transformer.encode(TEXTS, normalize_embeddings=True)).min() >= floor

    monkeypatch.setattr(embedding, "cpu_half_dtype", lambda: None)
    assert TransformersEngine(DEFAULT_MODEL, device="cpu").dtype == torch.float32
    monkeypatch.setattr(embedding, "cpu_half_dtype", lambda: half)
    assert TransformersEngine(DEFAULT_MODEL, device="cpu", dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ({}, None),  # AVX-512 alone emulates both: slower than fp32
        ({"avx512_bf16"}, "bfloat16"),  # this project's AMD EPYC
        ({"avx512_fp16", "avx512_bf16"}, "float16"),
        ({"amx", "avx512_fp16", "avx512_bf16"}, "bfloat16"),  # Sapphire Rapids: AMX-BF16 beats AVX512-FP16
        ({"amx", "amx_fp16", "avx512_fp16", "avx512_bf16"}, "float16"),  # Granite Rapids
        ({"raises"}, None),  # a torch build without the private checks
    ],
)
def test_cpu_half_dtype_takes_the_fastest_native_type(cpu, expected, monkeypatch):
    import torch

    from fineweb_modal.embedding import cpu_half_dtype

    def has(flag):
        def check():
            if "raises" in cpu:
                raise AttributeError("no such check in this build")
            return flag in cpu

        return check

    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", has("amx_fp16"), raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", has("amx"), raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", has("avx512_fp16"), raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", has("avx512_bf16"), raising=False)
    assert cpu_half_dtype() == (getattr(torch, expected) if expected else None)


def test_fp16_that_disagrees_with_fp32_is_not_used(monkeypatch, caplog):
    import torch

    from fineweb_modal import embedding

    monkeypatch.setattr(embedding, "cpu_half_dtype", lambda: torch.float16)
    monkeypatch.setattr(embedding, "CPU_HALF_MIN_COSINE", 1.01)  # no fp16 run can agree this well
    with logs_warning(caplog, "fp16 vectors disagree with fp32"):
        engine = TransformersEngine(DEFAULT_MODEL, device="cpu")
    assert engine.dtype == torch.float32 and next(engine.model.parameters()).dtype == torch.float32
    assert engine.tokens_embedded == 0


def test_an_fp16_overflow_is_recomputed_in_fp32(monkeypatch, caplog):
    import torch

    from fineweb_modal import embedding

    expected = TransformersEngine(DEFAULT_MODEL, device="cpu", dtype=torch.float32).embed(TEXTS)
    monkeypatch.setattr(embedding, "cpu_half_dtype", lambda: torch.float16)
    engine = TransformersEngine(DEFAULT_MODEL, device="cpu", batch_tokens=512)
    overflowing = engine.model.encoder.layer[-1].register_forward_hook(lambda module, args, output: output * torch.inf)
    with logs_warning(caplog, "fp16 overflowed on this block; switching to fp32"):
        vectors = engine.embed(TEXTS)
    overflowing.remove()
    assert engine.dtype == torch.float32 and next(engine.model.parameters()).dtype == torch.float32
    assert np.isfinite(vectors).all() and cosine_rows(vectors, expected).min() >= 0.99999
    assert engine.tokens_embedded == sum(len(e.ids) for e in engine.tokenizer.encode_batch(TEXTS))


def test_piece_bounds_cover_a_block_once_and_double_only_in_the_first():
    from fineweb_modal.embedding import FIRST_PIECE_ROWS, _piece_bounds

    assert _piece_bounds(5000, first=False) == [(0, 5000)]
    bounds = _piece_bounds(2048, first=True)
    assert bounds[0] == (0, FIRST_PIECE_ROWS)
    assert [start for start, _ in bounds[1:]] == [stop for _, stop in bounds[:-1]] and bounds[-1][1] == 2048
    sizes = [stop - start for start, stop in bounds]
    assert all(b == 2 * a for a, b in zip(sizes[:-2], sizes[1:-1]))
    assert _piece_bounds(3, first=True) == [(0, 3)] and _piece_bounds(0, first=True) == []


def test_first_block_runs_in_pieces_and_the_output_is_the_same_rows(tmp_path, monkeypatch):
    import fineweb_modal.embedding as embedding

    monkeypatch.setattr(embedding, "READ_BLOCK_ROWS", 16)
    monkeypatch.setattr(embedding, "FIRST_PIECE_ROWS", 2)
    n = 40
    texts = [f"{TEXTS[i % len(TEXTS)]} (row {i})" for i in range(n)]
    chunks = pa.table(
        {"id": [f"r{i}" for i in range(n)], "doc_index": pa.array(range(n), pa.int64()), "chunk_index": pa.array([0] * n, pa.int32()), "chunk_text": texts}
    )  # fmt: skip
    pq.write_table(chunks, tmp_path / "c.parquet")
    cfg = EmbedConfig(model=DEFAULT_MODEL)
    engine = get_engine(cfg)
    rows_per_run = []
    real_run = engine.run
    monkeypatch.setattr(engine, "run", lambda prepared: rows_per_run.append(prepared.rows) or real_run(prepared))
    stats = embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", cfg, tmp_path / "parts")
    assert rows_per_run == [2, 4, 8, 2, 16, 8], "pieces of 2, 4, 8 (and the rest) in the first block only"
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(n)] and stats.chunks == n and stats.dims == 384
    assert table.schema.metadata[b"fineweb_modal.dims"] == b"384"
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    # Pieces batch rows differently, so bf16/fp16 (where the CPU has them) round differently; a row out of place is far below.
    assert cosine_rows(vectors, real_run(engine.prepare(texts))).min() > 0.9999
    assert not (tmp_path / "parts").exists() and not list(tmp_path.glob(".*.tmp"))


def test_an_empty_chunk_file_gives_an_empty_embedding_file(tmp_path):
    empty = pa.table({"id": pa.array([], pa.string()), "doc_index": pa.array([], pa.int64()), "chunk_index": pa.array([], pa.int32()), "chunk_text": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "c.parquet")
    stats = embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", EmbedConfig(model=DEFAULT_MODEL), tmp_path / "parts")
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == 0 and stats.chunks == 0 and table.schema.field("embedding").type.list_size == 384


def test_model_encodings_skip_offsets_but_keep_the_ids():
    from fineweb_modal.models import encode_for_model, load_tokenizer

    tokenizer = load_tokenizer(model_info(DEFAULT_MODEL).path)
    fast, full = encode_for_model(tokenizer, TEXTS), tokenizer.encode_batch(TEXTS, add_special_tokens=True)
    assert [e.ids for e in fast] == [e.ids for e in full] and [len(e) for e in fast] == [len(e.ids) for e in full]
    assert fast[0].ids[0] == tokenizer.token_to_id("[CLS]") and fast[0].ids[-1] == tokenizer.token_to_id("[SEP]")


def test_freeze_needs_compile():
    with pytest.raises(ConfigError, match="freeze=True needs compile"):
        TransformersEngine(DEFAULT_MODEL, compile=False, freeze=True)


def test_freeze_compiles_q_k_v_and_gate_up_as_one_matmul_each():
    """Inductor's freezing, switched on around every call (a new shape recompiles frozen too); vectors unchanged."""
    import torch
    import torch._inductor.config as inductor
    from transformers import NomicBertConfig, NomicBertModel

    torch.manual_seed(0)
    model = NomicBertModel(NomicBertConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2)).eval()
    expected = TransformersEngine(DEFAULT_MODEL, model=model, attention="padded", compile=False, device="cpu").embed(TEXTS)
    frozen = TransformersEngine(DEFAULT_MODEL, model=model, attention="padded", compile=True, freeze=True, device="cpu", batch_tokens=256)
    matmuls_per_graph = []

    def count_matmuls(graph):
        matmuls_per_graph.append(sum(1 for node in graph.nodes if node.target is torch.ops.aten.mm.default))

    # On the CPU, inductor packs weights for oneDNN and concatenates only when asked; CUDA does the latter by default.
    with inductor.patch(post_grad_custom_post_pass=count_matmuls, **{"cpp.weight_prepack": False, "cpp.enable_concat_linear": True}):
        vectors = frozen.embed(TEXTS)
    assert cosine_rows(vectors, expected).min() >= 0.99999
    assert len(matmuls_per_graph) >= 2, "batches of different shapes compiled more than once"
    assert set(matmuls_per_graph) == {4}, "q/k/v, o, gate/up, down: 4 matmuls where 7 run unfrozen"


def test_the_cudnn_attention_kernel_runs_compiled_as_one_op_and_gives_the_same_vectors():
    """`attention_kernel="cudnn"` goes through our custom op, which torch.compile must trace as one call with a known
    output; on a CPU the op computes each sequence exactly, so the compiled cuDNN path equals the flash path here.
    (cuDNN's own kernel runs on a GPU only: `benchmarks/attention.py` compares the two kernels there.)"""
    import torch
    import torch._inductor.config as inductor
    from transformers import NomicBertConfig, NomicBertModel

    torch.manual_seed(0)
    model = NomicBertModel(NomicBertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2)).eval()
    flash = TransformersEngine(DEFAULT_MODEL, model=copy.deepcopy(model), attention="packed", compile=False, device="cpu", batch_tokens=128)
    cudnn = TransformersEngine(
        DEFAULT_MODEL, model=copy.deepcopy(model), attention="packed", compile=True, device="cpu", batch_tokens=128, attention_kernel="cudnn"
    )
    assert cudnn.model.config._attn_implementation == "fineweb_packed_cudnn" and flash.model.config._attn_implementation == "fineweb_packed"
    # Every cuDNN batch is padded to the budget's width (one q/k/v shape: cuDNN plans are cached per shape); flash's are not.
    widths = {batch["input_ids"].shape[1] for batch in cudnn.prepare(TEXTS).batches}
    real = [batch["tokens"] for batch in cudnn.prepare(TEXTS).batches]
    assert widths == {128} and min(real) < 128 and sum(real) == cudnn.prepare(TEXTS).tokens
    assert [batch["input_ids"].shape[1] for batch in flash.prepare(TEXTS).batches] == real
    ops_per_graph = []

    def count_attention_ops(graph):
        ops_per_graph.append(sum(1 for node in graph.nodes if "cudnn_packed_attention" in str(node.target)))

    with inductor.patch(post_grad_custom_post_pass=count_attention_ops):
        vectors = cudnn.embed(TEXTS)
    assert cudnn.compiled, "the compiled model fell back to eager"
    assert ops_per_graph and set(ops_per_graph) == {2}, "one opaque attention call per layer in every compiled graph"
    assert np.abs(vectors - flash.embed(TEXTS)).max() < 1e-5
    with pytest.raises(ConfigError, match="attention_kernel must be one of flash, cudnn"):
        TransformersEngine(DEFAULT_MODEL, model=copy.deepcopy(model), attention="packed", compile=False, device="cpu", attention_kernel="fa3")


@pytest.mark.parametrize(("choice", "compiled"), [("auto", False), ("on", True), ("off", False)])
def test_the_compile_choice_reaches_the_engine(choice, compiled):
    """`--compile on` compiles on the CPU too, with freezing (weights prepacked: 1.1–2× eager there); auto compiles on CUDA only."""
    engine = get_engine(EmbedConfig(model=DEFAULT_MODEL, compile=choice))
    assert (engine.forward is not engine.model) == compiled
    assert engine.freeze == compiled


@pytest.mark.parametrize("compiled", [True, False])
def test_falling_back_to_fp32_keeps_a_compiled_engine_compiled(compiled):
    """A bf16/fp16 overflow reloads the weights in fp32; `--compile on` must not silently become eager (~1.9× slower)."""
    import torch

    engine = TransformersEngine(DEFAULT_MODEL, device="cpu", dtype=torch.bfloat16, compile=compiled)
    old_model = engine.model
    engine._use_float32()
    assert engine.dtype == torch.float32 and engine.model is not old_model
    if compiled:
        assert engine.forward is not engine.model and engine.forward._orig_mod is engine.model
    else:
        assert engine.forward is engine.model


def test_the_compile_mode_reaches_torch_compile_and_survives_the_fp32_fallback(monkeypatch):
    """`compile_mode` (benchmarks/model_profile.py tries max-autotune) is torch.compile's `mode`, also after a reload in fp32."""
    import torch

    modes = []
    real_compile = torch.compile

    def recording_compile(model, mode=None, **options):
        modes.append(mode)
        return real_compile(model, mode=mode, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    engine = TransformersEngine(DEFAULT_MODEL, device="cpu", dtype=torch.bfloat16, compile=True, compile_mode="max-autotune-no-cudagraphs")
    engine._use_float32()
    assert modes == ["max-autotune-no-cudagraphs"] * 2 and engine.compiled
    default = TransformersEngine(DEFAULT_MODEL, device="cpu", compile=True)
    assert modes[-1] is None and default.compile_mode is None


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_a_rotary_model_looks_cos_and_sin_up_in_a_table_with_the_same_vectors(dtype_name):
    """nomic's rotary embedding becomes a table of its own outputs (computed once, not in every layer): same vectors,
    padded and packed, and the table covers every position the model's limit allows."""
    import torch
    from transformers import NomicBertConfig, NomicBertModel

    from fineweb_modal.rotary import tabulate_rotary

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    config = NomicBertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2, max_position_embeddings=512)
    model = NomicBertModel(config).eval().to(dtype)
    for attention in ("padded", "packed"):
        computed = TransformersEngine(DEFAULT_MODEL, model=copy.deepcopy(model), attention=attention, compile=False, device="cpu", dtype=dtype, rotary_table=False)
        assert type(computed.model.rotary_emb).__name__ == "NomicBertRotaryEmbedding"
        tabled = TransformersEngine(DEFAULT_MODEL, model=copy.deepcopy(model), attention=attention, compile=False, device="cpu", dtype=dtype)
        table = tabled.model.rotary_emb
        assert type(table).__name__ == "RotaryTable" and table.cos.shape == (512, 32)
        assert np.abs(tabled.embed(TEXTS) - computed.embed(TEXTS)).max() < 1e-6
    ids = torch.tensor([[0, 7, 511]])
    x = torch.empty(0, dtype=dtype)
    expected = computed.model.rotary_emb(x, ids)  # the module the table replaced, with the same (cast) frequencies
    assert all(torch.equal(a, b) for a, b in zip(table(x, ids), expected))
    assert tabulate_rotary(torch.nn.Linear(2, 2), 16) == 0  # no rotary embedding: nothing replaced
    torch.save(tabled.model, io.BytesIO())  # a tabled model still pickles

    shared = NomicBertModel(config).eval()
    shared.layers[0].rotary_alias = shared.rotary_emb  # one module under two names: one table, both names replaced
    assert tabulate_rotary(shared, 64) == 1 and shared.layers[0].rotary_alias is shared.rotary_emb
    assert type(shared.rotary_emb).__name__ == "RotaryTable"

    class OddRotaryEmbedding(torch.nn.Module):  # another signature than transformers' (x, position_ids): left alone
        rope_type = "default"

        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.ones(4))

        def forward(self, seq_len: int):
            return torch.zeros(seq_len, 8)

    holder = torch.nn.Sequential(OddRotaryEmbedding())
    assert tabulate_rotary(holder, 16) == 0 and type(holder[0]).__name__ == "OddRotaryEmbedding"


def test_chunks_cut_with_another_tokenizer_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Their token counts and fit are another model's: embedding them with --model B alone must say so, not embed them."""
    import json

    from fineweb_modal.config import build_run_config
    from fineweb_modal.models import resolve_model_path

    cut_with = build_run_config(name="d", stages="chunk", max_tokens=64).chunk
    chunks = pa.table({"id": ["a"], "doc_index": pa.array([0], pa.int64()), "chunk_index": pa.array([0], pa.int32()), "chunk_text": ["a chunk"]})
    pq.write_table(chunks.replace_schema_metadata({"fineweb_modal.chunk_config": cut_with.model_dump_json()}), tmp_path / "c.parquet")
    other = tmp_path / "other-model"  # the same weights, another tokenizer file
    other.mkdir()
    for file in resolve_model_path(DEFAULT_MODEL).iterdir():
        (other / file.name).symlink_to(file)
    (other / "tokenizer.json").unlink()
    (other / "tokenizer.json").write_text(json.dumps(json.loads((resolve_model_path(DEFAULT_MODEL) / "tokenizer.json").read_text()), indent=1))
    import fineweb_modal.embedding as embedding

    monkeypatch.setattr(embedding, "get_engine", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(BadDataError, match=rf"cut with {DEFAULT_MODEL}'s tokenizer, not {other}'s; chunk it again with --model {other}"):
        embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", EmbedConfig(model=str(other)), tmp_path / "parts")
    assert not (tmp_path / "e.parquet").exists()
