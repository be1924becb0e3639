"""The TEI client against a test double of TEI's API: right vectors, every limit kept, every fault survived."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fineweb_modal.embedding import TEIEngine, TransformersEngine
from fineweb_modal.errors import ConfigError, is_transient
from fineweb_modal.models import DEFAULT_MODEL
from fineweb_modal.tei import TEIAuthError, TEIClient, TEIInfo, TEIRequestError, TEIUnavailable, pack_requests
from tests.tei_double import TEITestDouble

TEXTS = [f"Document {i}: " + "words and more words " * (1 + i % 17) for i in range(120)]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return TransformersEngine(DEFAULT_MODEL).embed(TEXTS)


@pytest.fixture
def double():
    server = TEITestDouble(max_batch_tokens=2048, max_client_batch_size=16, max_concurrent_requests=64, compute_delay_s=0.02).start()
    yield server
    server.stop()


def fast_engine(url: str, **client_options) -> TEIEngine:
    engine = TEIEngine(url, DEFAULT_MODEL)
    engine.client = TEIClient(url, backoff_base_s=0.01, backoff_cap_s=0.2, **client_options)
    return engine


def assert_same_rows(vectors: np.ndarray, reference: np.ndarray) -> None:
    assert vectors.shape == reference.shape
    cosine = (vectors * reference).sum(axis=1)
    assert cosine.min() >= 0.999, "every row holds its own text's vector: none lost, none swapped"


@given(
    counts=st.lists(st.integers(3, 300), min_size=1, max_size=300),
    budget=st.integers(300, 5000),
    max_items=st.integers(1, 64),
    max_payload=st.integers(2000, 50_000),
)
@settings(max_examples=200, deadline=None)
def test_packing_respects_every_limit_and_covers_each_row_once(counts, budget, max_items, max_payload):
    sizes = [n * 4 for n in counts]
    requests = pack_requests(counts, sizes, budget, max_items, max_payload)
    flat = [i for r in requests for i in r]
    assert sorted(flat) == list(range(len(counts)))
    for request in requests:
        assert len(request) <= max_items
        if len(request) > 1:
            assert sum(counts[i] for i in request) <= budget
            assert sum(sizes[i] + 8 for i in request) <= max_payload


def test_vectors_match_the_in_process_engine_and_limits_hold(double, reference):
    engine = fast_engine(double.url)
    vectors = engine.embed(TEXTS)
    assert_same_rows(vectors, reference)
    m = double.metrics
    assert m.embedded_inputs == len(TEXTS) and set(m.statuses) == {200}
    assert m.max_request_inputs <= 16 and m.max_inputs_in_flight <= 64 and m.max_payload_bytes <= 2_000_000
    assert m.max_request_tokens <= 2048 // 2 + 300
    # Several requests in flight: the server had more queued than one request can hold.
    assert m.max_inputs_in_flight > 16 and m.max_tokens_in_flight >= 2048
    assert engine.tokens_embedded == sum(len(e.ids) for e in engine_tokenizer().encode_batch(TEXTS))
    assert engine.metadata()["engine"] == "tei test-double"


def engine_tokenizer():
    from fineweb_modal.models import load_tokenizer, model_info

    return load_tokenizer(model_info(DEFAULT_MODEL).path)


def test_429_503_resets_and_slow_answers_are_survived(double, reference):
    double.faults = ["429"] * 4 + ["503"] * 3 + ["reset"] * 2 + ["slow"] * 2 + ["429", "reset", "503"]
    double.slow_s = 4.0
    # Generous retries: a timed-out request still holds its inputs on the server for a while (as TEI's would),
    # so 429s for the concurrency limit come on top of the injected ones, more so on a loaded machine. The
    # timeout leaves room for requests queued behind the double's one compute lock on a busy 2-core machine
    # (0.7 s once made every retry time out in turn); only the two "slow" answers must exceed it.
    engine = fast_engine(double.url, timeout_s=2.5, max_retries=40)
    vectors = engine.embed(TEXTS)
    assert_same_rows(vectors, reference)
    assert double.faults == []
    assert engine.client.stats.retries >= 14
    assert double.metrics.statuses[429] >= 5 and double.metrics.statuses[503] >= 4


def test_a_tei_restarting_behind_a_proxy_500_502_504_is_survived(double, reference):
    """A proxy's plain-text 500/502/504 while TEI restarts (and its 408) are retried like TEI's own 503: no row lost or doubled."""
    double.faults = ["500", "502", "504", "408"] * 2
    engine = fast_engine(double.url, max_retries=20)
    vectors = engine.embed(TEXTS)
    assert_same_rows(vectors, reference)
    assert double.faults == [] and double.metrics.embedded_inputs == len(TEXTS), "each text embedded once"
    assert all(engine.client.stats.statuses[status] == 2 for status in (408, 500, 502, 504))
    assert "HTTP 408 ×2, HTTP 500 ×2, HTTP 502 ×2, HTTP 504 ×2" in engine.client.stats.retried()

def test_a_failure_of_teis_model_fails_the_shard_as_transient_at_once(double, reference):
    """TEI's 424 (its backend failed on a batch, e.g. out of GPU memory) is not retried request by request: the
    shard fails as transient, so Prefect retries it (from its last part) rather than each request 9 times."""
    engine = fast_engine(double.url)
    engine.embed(TEXTS[:4])  # a warm engine: the requests below start together
    double.faults = ["424"]
    double.compute_delay_s = 0.5  # the other requests are still in TEI's hands when the 424 comes back
    with pytest.raises(TEIUnavailable, match="TEI answered HTTP 424 for .* chunks: .*CUDA out of memory") as failure:
        engine.embed(TEXTS)
    assert is_transient(failure.value)
    stats = engine.client.stats
    assert stats.requests > 2 and stats.retries == 0 and stats.transport_errors == 0, "the others cancelled, not cut off by the closed client and retried"
    double.compute_delay_s = 0.02
    # TEI (and the double) still computes what the client gave up on, and may not even have read those requests
    # yet on a busy machine: the next shard's requests meet 429s until it is done. A production backoff (seconds)
    # outlasts that; the test's 0.2 s cap need not, so the recovery gets a patient one.
    deadline = time.monotonic() + 60
    while double.metrics.inputs_in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.client.backoff_base_s, engine.client.backoff_cap_s = 0.2, 2.0
    assert_same_rows(engine.embed(TEXTS), reference)


def test_a_request_a_retry_cannot_pass_is_a_configuration_error(double):
    """Any other 4xx (here a proxy's 404 on /embed) is not TEI being busy: said at once, not retried by Prefect."""
    double.faults = ["404"]
    with pytest.raises(ConfigError, match=r"TEI at http://127\.0\.0\.1:\d+ answered HTTP 404 to POST /embed: 404 Not Found") as failure:
        fast_engine(double.url).embed(TEXTS[:10])
    assert not is_transient(failure.value)

def test_a_server_that_dies_mid_shard_and_comes_back(double, reference):
    engine = fast_engine(double.url, max_retries=25)
    engine.client.backoff_cap_s = 0.5
    double.compute_delay_s = 0.2

    async def embed_while_restarting():
        task = asyncio.get_running_loop().run_in_executor(None, engine.embed, TEXTS)
        await asyncio.sleep(0.3)
        double.restart_after(1.0)
        return await task

    vectors = asyncio.run(embed_while_restarting())
    assert_same_rows(vectors, reference)
    assert engine.client.stats.retries >= 1


def test_payload_over_the_limit_is_split(reference):
    server = TEITestDouble(max_client_batch_size=64, payload_limit=3000).start()
    try:
        engine = fast_engine(server.url)
        vectors = engine.embed(TEXTS)
        assert_same_rows(vectors, reference)
        assert server.metrics.statuses[413] >= 1 and engine.client.stats.splits >= 1
    finally:
        server.stop()


def test_a_rejected_chunk_is_named(double):
    double.poison = "Document 37:"
    engine = fast_engine(double.url)
    names = [f"(doc_index={i}, chunk_index=0)" for i in range(len(TEXTS))]
    with pytest.raises(TEIRequestError, match=r"doc_index=37, chunk_index=0"):
        engine.embed(TEXTS, row_names=names)


def test_a_request_tei_refuses_whole_is_not_blamed_on_a_chunk(double):
    double.reject_every_embed = "Input validation error: `dimensions` is not supported"
    with pytest.raises(ConfigError, match="rejects every /embed request of this run, not one chunk.*dimensions") as failure:
        fast_engine(double.url).embed(TEXTS[:40], row_names=[f"(doc_index={i}, chunk_index=0)" for i in range(40)])
    assert not isinstance(failure.value, TEIRequestError)


def test_a_dead_server_is_a_transient_failure():
    client = TEIClient("http://127.0.0.1:9", max_retries=2, backoff_base_s=0.01, timeout_s=1)
    with pytest.raises(TEIUnavailable, match="failed 3 times"):
        asyncio.run(client.info())


def test_a_server_with_another_model_is_refused(double):
    double.served_model_id = "nomic-ai/nomic-embed-text-v1.5"
    with pytest.raises(ConfigError, match="TEI serves 'nomic-ai/nomic-embed-text-v1.5'"):
        TEIEngine(double.url, DEFAULT_MODEL)


def test_a_server_under_another_name_needs_the_user_to_vouch_for_it(double, reference):
    """Inference Endpoints report `/repository`: refused by default, naming the flag; taken when vouched for, exactly."""
    double.served_model_id = "/repository"
    with pytest.raises(ConfigError, match="--tei-served-model /repository"):
        TEIEngine(double.url, DEFAULT_MODEL)
    with pytest.raises(ConfigError, match="TEI serves '/repository', not '/repo' as --tei-served-model says"):
        TEIEngine(double.url, DEFAULT_MODEL, served_as="/repo")
    vectors = TEIEngine(double.url, DEFAULT_MODEL, served_as="/repository").embed(TEXTS)
    assert (vectors * reference).sum(axis=1).min() > 0.999


def test_api_key_is_sent_as_bearer_and_never_shown(reference, monkeypatch, caplog):
    secret = "tei-secret-0123456789"
    server = TEITestDouble(api_key=secret).start()
    monkeypatch.setenv("TEI_API_KEY", secret + "\n")  # as pasted from a file: the newline is not part of the key
    caplog.set_level(logging.DEBUG)
    try:
        engine = TEIEngine(server.url, DEFAULT_MODEL)
        assert_same_rows(engine.embed(TEXTS[:10]), reference[:10])
        assert set(server.metrics.auth_headers) == {f"Bearer {secret}"}
        assert secret not in repr(engine.client) and secret not in caplog.text
        # TEI guards /info too: a wrong or missing key is a configuration error at start-up, not retried.
        monkeypatch.setenv("TEI_API_KEY", "wrong-key-9876")
        with pytest.raises(TEIAuthError, match="HTTP 401: the API key was refused") as failure:
            TEIEngine(server.url, DEFAULT_MODEL)
        assert "wrong-key-9876" not in str(failure.value) and not is_transient(failure.value)
        monkeypatch.delenv("TEI_API_KEY")
        with pytest.raises(TEIAuthError, match="set TEI_API_KEY"):
            TEIEngine(server.url, DEFAULT_MODEL)
    finally:
        server.stop()


def test_a_403_refusal_and_a_key_that_stops_working_mid_run_are_not_retried(reference, monkeypatch):
    """A proxy answering 403 is a refused key as TEI's 401 is; a key revoked during a run (between two embed
    calls: two shards, or two blocks of one) fails at once, not retried."""
    server = TEITestDouble(api_key="key-one-SECRET", refusal_status=403).start()
    try:
        monkeypatch.setenv("TEI_API_KEY", "key-two-SECRET")
        with pytest.raises(TEIAuthError, match="HTTP 403: the API key was refused") as failure:
            TEIEngine(server.url, DEFAULT_MODEL)
        assert "SECRET" not in str(failure.value)
        monkeypatch.setenv("TEI_API_KEY", "key-one-SECRET")
        engine = fast_engine(server.url, api_key="key-one-SECRET", max_retries=20)
        assert_same_rows(engine.embed(TEXTS[:10]), reference[:10])
        server.api_key = "key-rotated-SECRET"
        with pytest.raises(TEIAuthError, match="HTTP 403: the API key was refused") as failure:
            engine.embed(TEXTS)
        assert not is_transient(failure.value) and "SECRET" not in str(failure.value)
        assert engine.client.stats.retries == 0, "no request retried"
    finally:
        server.stop()

def test_a_key_no_header_can_carry_is_refused_without_showing_it():
    with pytest.raises(ConfigError, match="cannot carry") as failure:
        TEIClient("http://127.0.0.1:9", api_key="abc\ndef-secret")
    assert "def-secret" not in str(failure.value)


def test_something_that_is_not_tei_is_refused_clearly(double):
    with pytest.raises(ConfigError, match="HTTP 404.*is this a TEI server"):
        TEIEngine(double.url + "/not-tei", DEFAULT_MODEL)


def test_info_is_read_as_tei_serves_it(double):
    info = asyncio.run(TEIClient(double.url).info())
    assert info.model_pooling == "mean" and info.max_client_batch_size == 16  # pooling from model_type.embedding
    assert TEIEngine(double.url, DEFAULT_MODEL).metadata()["pooling"] == "mean"
    with pytest.raises(ConfigError, match="lacks max_batch_tokens"):
        TEIInfo.from_json({"model_id": "m", "max_input_length": 1, "max_client_batch_size": 1, "max_concurrent_requests": 1})


def test_a_tei_that_ignores_dimensions_is_cut_and_renormalized(reference):
    full, cut = TEITestDouble().start(), TEITestDouble(honors_dimensions=False).start()
    try:
        expected = TEIEngine(full.url, DEFAULT_MODEL, dimensions=128).embed(TEXTS[:20])
        got = TEIEngine(cut.url, DEFAULT_MODEL, dimensions=128).embed(TEXTS[:20])
        assert got.shape == (20, 128) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert (got * expected).sum(axis=1).min() > 0.99999
    finally:
        full.stop()
        cut.stop()


def test_a_chunk_over_teis_character_cap_is_named_before_any_request(double):
    """TEI refuses over max_input_length × 250 characters (one huge `[UNK]` word makes few tokens of many)."""
    import httpx

    giant = "a" * (double.limits["max_input_length"] * 250 + 1)  # one word: one [UNK] token
    response = httpx.post(f"{double.url}/embed", json={"inputs": [giant], "truncate": False})
    assert response.status_code == 413 and "characters" in response.json()["error"], "the double refuses it as TEI does"
    texts = [*TEXTS[:5], giant]
    names = [f"(doc_index={i}, chunk_index=0)" for i in range(len(texts))]
    requests_before = double.metrics.statuses.get(200, 0)
    with pytest.raises(TEIRequestError, match=rf"doc_index=5, chunk_index=0\) has {len(giant):,} characters .*--engine transformers"):
        fast_engine(double.url).embed(texts, row_names=names)
    assert double.metrics.statuses.get(200, 0) == requests_before, "no GPU time spent on a shard that cannot finish"


def test_dimensions_wider_than_the_model_fail_at_the_first_answer(double):
    """Refused at start-up where the model's config is here; else TEI (>= 1.8) refuses after computing, once."""
    with pytest.raises(ConfigError, match="dimensions=1024 is more than"):
        TEIEngine(double.url, DEFAULT_MODEL, dimensions=1024)
    engine = fast_engine(double.url)
    engine.dimensions = 1024
    with pytest.raises(ConfigError, match="TEI refuses dimensions=1024"):
        engine.embed(TEXTS[:40])
    assert engine.client.stats.splits == 0


def test_a_resumed_shard_reuses_the_parts_whether_the_engine_was_warm_or_fresh(double, tmp_path, monkeypatch):
    """A TEI engine learns its width from its first answer: the parts' stamp must not depend on that."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import fineweb_modal.embedding as embedding
    from fineweb_modal.config import EmbedConfig

    monkeypatch.setattr(embedding, "READ_BLOCK_ROWS", 8)
    n = 16
    chunks = pa.table(
        {"id": [str(i) for i in range(n)], "doc_index": pa.array(range(n), pa.int64()), "chunk_index": pa.array([0] * n, pa.int32()), "chunk_text": TEXTS[:n]}
    )
    pq.write_table(chunks, tmp_path / "c.parquet")
    cfg = EmbedConfig(model=DEFAULT_MODEL, engine="tei", tei_url=double.url)
    warm = fast_engine(double.url)
    warm.embed(["a warm engine has learnt its width"])
    real_run, calls = warm.run, []

    def preempted_at_the_second_block(prepared):
        calls.append(len(prepared[0]))  # (inputs, token counts, row names)
        if len(calls) == 2:
            raise ConnectionError("preempted")
        return real_run(prepared)

    monkeypatch.setattr(warm, "run", preempted_at_the_second_block)
    with pytest.raises(ConnectionError):
        embedding.embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", cfg, tmp_path / "parts", engine=warm)
    fresh, fresh_calls = fast_engine(double.url), []
    fresh_run = fresh.run
    monkeypatch.setattr(fresh, "run", lambda prepared: fresh_calls.append(len(prepared[0])) or fresh_run(prepared))
    embedding.embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", cfg, tmp_path / "parts", engine=fresh)
    assert fresh_calls == [8], "the first part was reused: only the second block was embedded"
    assert pq.read_table(tmp_path / "e.parquet").column("id").to_pylist() == [str(i) for i in range(n)]


def test_a_shard_with_no_chunk_gets_the_served_width(double, tmp_path):
    """All its documents blank: no answer to learn the width from, yet its vector type must be its siblings' (else they do not concatenate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fineweb_modal.config import EmbedConfig
    from fineweb_modal.embedding import embed_shard

    empty = pa.table({"id": pa.array([], pa.string()), "doc_index": pa.array([], pa.int64()), "chunk_index": pa.array([], pa.int32()), "chunk_text": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "c.parquet")
    cfg = EmbedConfig(model=DEFAULT_MODEL, engine="tei", tei_url=double.url)
    stats = embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", cfg, tmp_path / "parts", engine=fast_engine(double.url))
    assert stats.dims == 384 and pq.read_schema(tmp_path / "e.parquet").field("embedding").type == pa.list_(pa.float32(), 384)


def test_a_shards_retries_are_counted_and_logged_for_its_task(double, tmp_path, caplog):
    """An operator sees that TEI was overloaded (429s) in the shard's task log and result, not only in its speed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fineweb_modal.config import EmbedConfig
    from fineweb_modal.embedding import embed_shard

    n = len(TEXTS)
    chunks = pa.table({"id": [str(i) for i in range(n)], "doc_index": pa.array(range(n), pa.int64()), "chunk_index": pa.array([0] * n, pa.int32()), "chunk_text": TEXTS})
    pq.write_table(chunks, tmp_path / "c.parquet")
    cfg = EmbedConfig(model=DEFAULT_MODEL, engine="tei", tei_url=double.url)
    engine = fast_engine(double.url)
    engine.embed(["an earlier shard's requests are not this one's"])
    double.faults = ["429"] * 3
    with caplog.at_level(logging.WARNING, logger="fineweb_modal"):
        stats = embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", cfg, tmp_path / "parts", engine=engine)
    assert stats.tei_requests["retries"] >= 3 and stats.tei_requests["statuses"][429] >= 3
    assert stats.tei_requests["requests"] == stats.tei_requests["statuses"][200], "each answered once, and the earlier shard's not counted"
    warned = [r.getMessage() for r in caplog.records if "TEI at" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("c.parquet: TEI at http://127.0.0.1:") and "HTTP 429 ×" in warned[0]

    double.faults = []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fineweb_modal"):
        calm = embed_shard(tmp_path / "c.parquet", tmp_path / "e2.parquet", cfg, tmp_path / "parts2", engine=engine)
    assert calm.tei_requests["retries"] == 0 and not [r for r in caplog.records if "TEI at" in r.getMessage()]


def test_the_double_can_be_served_by_hand_to_try_the_tei_engine():
    """`python -m tests.tei_double` (README: trying `--engine tei` without TEI) answers /info and stops on Ctrl-C."""
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "tests.tei_double", "--port", "0"], cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        said = process.stdout.readline()
        url = re.search(r"\(not TEI\) serving .* on (http://127\.0\.0\.1:\d+); Ctrl-C stops it", said).group(1)
        assert httpx.get(f"{url}/info", timeout=10).json()["model_id"] == DEFAULT_MODEL
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
