"""The chunker's promises: exact spans, full coverage, every chunk fits, no chunk is pure overlap."""

from __future__ import annotations

import string

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineweb_modal.chunking import SPECIAL_TOKENS, chunk_shard, chunk_texts, plan_windows
from fineweb_modal.config import build_run_config
from fineweb_modal.errors import BadDataError
from fineweb_modal.models import DEFAULT_MODEL, load_tokenizer, model_info
from fineweb_modal.storage import parquet_key_values
from tests.conftest import write_arrow_shard

TOKENIZER = load_tokenizer(model_info(DEFAULT_MODEL).path)
PIECES = [
    "the", "cat", "sat", "on", "mat", "unbelievably", "antidisestablishmentarianism", "Hello", "WORLD", ",", ".",
    "don't", "e.g.", "naïve", "café", "Ünïcödé", "中文字", "日本語", "😀", "👩‍👩‍👧", "مرحبا", "שלום", "e\u0301", "\x00",
    "\x07", "\u200b", "a" * 30, "x" * 120, "3.14159", "https://example.com/a?b=c", "(", ")", "ﬁ", "Ⅻ",
]
SEPARATORS = [" ", "  ", "\n", "\t", "", " \n\n "]


def chunk_config(max_tokens: int, overlap: float):
    return build_run_config(name="t", stages="chunk", max_tokens=max_tokens, overlap=overlap).chunk


documents = st.lists(st.tuples(st.sampled_from(PIECES), st.sampled_from(SEPARATORS)), max_size=300).map(
    lambda parts: "".join(p + s for p, s in parts)
)
# Long words WordPiece splits unevenly (cut inside, they re-tokenize differently) and Hangul, whose syllables
# become several jamo tokens that share one character.
long_words = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=20, max_size=200)
hangul = st.text(alphabet=st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3), min_size=5, max_size=60)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(documents, st.text(max_size=400), long_words, hangul), max_tokens=st.integers(16, 80), overlap=st.sampled_from([0.0, 0.1, 0.25, 0.5]))
def test_chunks_are_exact_fitting_covering_and_never_pure_overlap(text, max_tokens, overlap):
    check_chunk_promises(text, max_tokens, overlap)


@pytest.mark.parametrize(
    ("text", "overlap"),
    [
        ("mkx9w2z2u3ejohjz38nxcbznf008nai75ty88ef5an0xtfbpb6xj3qh2royy6voqfcju5e741uybh1ijbh1pcrqyhwsxm", 0.0),  # a window shrunk to fit left char 39 out
        ("국한트텍스텍스트한국어텍스트한국", 0.0),  # a cut among one syllable's jamo brought in two more tokens than counted
        ("3stwxd9haxtxvkshiui8ka399dybxh2j3t1ahju4", 0.5),  # the rest of a shrunk window lay inside the next one
    ],
)
def test_windows_cut_inside_words_still_cover_and_fit(text, overlap):
    check_chunk_promises(text, 16, overlap)


def check_chunk_promises(text: str, max_tokens: int, overlap: float) -> None:
    """Exact spans that fit and are counted right, every kept character covered, no chunk pure overlap."""
    cfg = chunk_config(max_tokens, overlap)
    rows, stats = chunk_texts([text], cfg)
    encoding = TOKENIZER.encode(text, add_special_tokens=False)
    if not encoding.ids:
        assert rows == [] and stats.empty_docs == 1
        return
    assert [r[1] for r in rows] == list(range(len(rows)))
    previous_start = previous_end = -1
    for _, _, start, end, count in rows:
        chunk = text[start:end]
        assert chunk, "a chunk holds at least one token's characters"
        retokenized = len(TOKENIZER.encode(chunk, add_special_tokens=False).ids)
        assert retokenized + SPECIAL_TOKENS <= max_tokens
        assert count == retokenized + SPECIAL_TOKENS, "chunk_token_count is the chunk's own token count"
        assert end > previous_end, "a chunk that ends where the previous one ended adds nothing"
        assert start > previous_start, "a chunk that starts where the previous one started or before holds it whole"
        previous_start, previous_end = start, end
    # Every character the tokenizer keeps lies inside some chunk.
    for token_start, token_end in encoding.offsets:
        assert any(start <= token_start and token_end <= end for _, _, start, end, _ in rows)
    assert stats.source_tokens == len(encoding.ids)


@given(
    n_tokens=st.integers(1, 400),
    word_lengths=st.lists(st.integers(1, 40), min_size=1, max_size=200),
    window=st.integers(14, 78),
    overlap=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
)
@settings(max_examples=300, deadline=None)
def test_planned_windows_tile_the_document(n_tokens, word_lengths, window, overlap):
    starts, position = [], 0
    for length in word_lengths:
        if position >= n_tokens:
            break
        starts.append(position)
        position += length
    start_set = set(starts)
    windows = plan_windows(n_tokens, start_set.__contains__, window, int(overlap * window))
    assert windows[0][0] == 0 and windows[-1][1] == n_tokens
    for (s1, e1), (s2, e2) in zip(windows, windows[1:]):
        assert s2 <= e1, "no gap between neighbours"
        assert e2 > e1 and s2 > s1, "each window reaches further"
    for start, end in windows:
        assert 0 < end - start <= window
        # A window starts inside a word only when that word is longer than a window.
        if start not in starts:
            word_start = max(s for s in starts if s < start)
            word_end = min([s for s in starts if s > start] + [n_tokens])
            assert word_end - word_start > window


def test_short_document_is_one_chunk_with_exact_text():
    cfg = chunk_config(64, 0.1)
    text = "  Leading spaces, then Mixed Case text.  "
    rows, _ = chunk_texts([text], cfg)
    assert len(rows) == 1
    _, _, start, end, count = rows[0]
    assert text[start:end] == "Leading spaces, then Mixed Case text."
    assert count == len(TOKENIZER.encode(text, add_special_tokens=False).ids) + 2


def test_windows_start_on_words_and_overlap():
    cfg = chunk_config(32, 0.25)
    text = " ".join(f"word{i} is here" for i in range(200))
    rows, _ = chunk_texts([text], cfg)
    assert len(rows) > 5
    for (_, _, _, e1, _), (_, _, s2, _, _) in zip(rows, rows[1:]):
        assert s2 < e1, "neighbouring chunks share text"
        assert text[s2 - 1] == " " and not text[s2:].startswith("##")


def test_empty_and_non_text_documents_are_counted_not_chunked():
    cfg = chunk_config(64, 0.1)
    rows, stats = chunk_texts([None, "", "   \n\t", "\x00\x07\u200b", "real text"], cfg)
    assert stats.empty_docs == 4 and stats.docs == 5
    assert [r[0] for r in rows] == [4]


def test_big_document_is_fully_covered(tmp_path):
    cfg = chunk_config(256, 0.1)
    text = ("All work and no play makes Jack a dull boy. " * 25_000)[:1_000_000]
    rows, stats = chunk_texts([text], cfg)
    assert rows[0][2] == 0 and rows[-1][3] == len(text.rstrip())
    assert all(b[2] <= a[3] for a, b in zip(rows, rows[1:]))
    assert stats.chunks == len(rows) and all(r[4] <= 256 for r in rows)


def test_chunk_shard_writes_exact_columns(tmp_path, demo_documents):
    cfg = chunk_config(64, 0.1)
    rows = [dict(d) for d in demo_documents[:5]]
    rows[1]["text"] = None
    rows[2]["id"] = None
    source = write_arrow_shard(tmp_path / "in" / "s0.arrow", rows)
    output = tmp_path / "out" / "s0.parquet"
    stats = chunk_shard(source, output, "s0", cfg)
    table = pq.read_table(output)
    assert table.column_names == ["id", "doc_index", "chunk_index", "chunk_text", "char_start", "char_end", "chunk_token_count", "url", "score", "dump"]
    assert stats.docs == 5 and stats.empty_docs == 1 and stats.chunks == table.num_rows
    for row in table.to_pylist():
        source_row = rows[row["doc_index"]]
        assert row["chunk_text"] == source_row["text"][row["char_start"] : row["char_end"]]
        assert row["url"] == source_row["url"]
        assert row["id"] == (source_row["id"] or f"s0:{row['doc_index']}")
    assert 1 not in set(table.column("doc_index").to_pylist())
    keys = list(zip(table.column("doc_index").to_pylist(), table.column("chunk_index").to_pylist()))
    assert len(keys) == len(set(keys))
    metadata = parquet_key_values(pq.ParquetFile(output))
    assert metadata["fineweb_modal.docs"] == "5" and metadata["fineweb_modal.empty_docs"] == "1"


def test_chunking_is_deterministic(tmp_path, demo_documents):
    cfg = chunk_config(64, 0.1)
    source = write_arrow_shard(tmp_path / "in" / "s0.arrow", demo_documents)
    chunk_shard(source, tmp_path / "a.parquet", "s0", cfg)
    chunk_shard(source, tmp_path / "b.parquet", "s0", cfg)
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_missing_columns_name_the_ones_that_exist(tmp_path):
    source = write_arrow_shard(tmp_path / "s.arrow", [{"body": "x", "url": "u"}])
    with pytest.raises(BadDataError, match=r"\['text', 'score', 'dump'\] not found; the shard has \['body', 'url'\]"):
        chunk_shard(source, tmp_path / "o.parquet", "s", chunk_config(64, 0.1))
    assert not (tmp_path / "o.parquet").exists()


def test_non_string_text_column_is_bad_data(tmp_path):
    source = write_arrow_shard(tmp_path / "s.arrow", [{"text": 1, "url": "u", "score": 1.0, "dump": "d"}])
    with pytest.raises(BadDataError, match="expected a string"):
        chunk_shard(source, tmp_path / "o.parquet", "s", chunk_config(64, 0.1))
