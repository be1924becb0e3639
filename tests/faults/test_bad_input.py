"""Garbage in: every kind of odd document gets exact chunks or a counted skip; a bad shard fails alone, with a
clear message; a dataset without its text column is refused before any work."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fineweb_modal.errors import BadDataError
from fineweb_modal.shards import ShardJob, layout_for, run_shard
from fineweb_modal.storage import sample_arrow_rows
from tests.conftest import _go_online

ODD_DOCUMENTS = {
    "none": None,
    "empty": "",
    "whitespace": " \n\t \u00a0 \u3000 ",
    "control-and-nul": "before\x00after \x07bell\x1b[31m escape\r\nline \x7f end",
    "right-to-left": "שלום עולם, זה טקסט בעברית. مرحبا بالعالم، هذا نص عربي.",
    "cjk": "机器学习是人工智能的一个分支。日本語のテキストも含まれています。한국어 문장도 있습니다.",
    "emoji": "Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin tones 👍🏽 and a plain smile 😀.",
    "combining": "Cafe\u0301 nai\u0308ve Zalgo: Z\u0351\u034b\u0352a\u0364\u0311l\u0363\u0349g\u035bo\u0310",
    "one-huge-word": "x" * 100_000,
    "duplicate-id-1": "the same id as the next document, different text",
    "duplicate-id-2": "the same id as the previous document",
}


def ids_for(names: list[str]) -> list[str]:
    return ["dup" if n.startswith("duplicate-id") else n for n in names]


@pytest.fixture
def odd_dataset(tmp_path, run_config_for):
    source = tmp_path / "source" / "odd"
    names = list(ODD_DOCUMENTS)
    pq.write_table(pa.table({"id": ids_for(names), "text": pa.array(list(ODD_DOCUMENTS.values()), pa.large_string())}), source / "s0.parquet") if source.mkdir(parents=True) is None else None
    big = " ".join(f"word{i % 977} of a five megabyte document." for i in range(150_000))[: 5 * 1024 * 1024]
    pq.write_table(pa.table({"id": ["big"], "text": [big]}), source / "s1.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), source / "s2-empty.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "text": [1, 2]}), source / "s3-ints.parquet")
    return run_config_for(source, keep_columns="", max_tokens=64), source


def downloaded(run, source, shard):
    return run_shard(ShardJob(stage="download", shard=shard, run=run, source_file=str(source / f"{shard}.parquet")))


def test_odd_documents_get_exact_chunks_or_a_counted_skip(odd_dataset):
    run, source = odd_dataset
    downloaded(run, source, "s0")
    result = run_shard(ShardJob(stage="chunk", shard="s0", run=run))
    assert result.docs == len(ODD_DOCUMENTS) and result.empty_docs == 3, "None, empty and whitespace-only are counted skips"
    chunks = pq.read_table(layout_for(run).output_path("chunk", "s0")).to_pylist()
    texts = list(ODD_DOCUMENTS.values())
    for chunk in chunks:
        assert chunk["chunk_text"] == texts[chunk["doc_index"]][chunk["char_start"] : chunk["char_end"]], "exact spans"
    chunked = {list(ODD_DOCUMENTS)[c["doc_index"]] for c in chunks}
    assert chunked == set(ODD_DOCUMENTS) - {"none", "empty", "whitespace"}
    huge = [c for c in chunks if c["id"] == "one-huge-word"]
    assert "".join(c["chunk_text"] for c in huge) == "x" * 100_000, "one 100 k-character word: kept whole (the tokenizer makes it [UNK])"
    assert [c["chunk_token_count"] for c in huge] == [3], "one chunk: [CLS], the one [UNK] token, [SEP]"
    duplicates = [c for c in chunks if c["id"] == "dup"]
    assert {c["doc_index"] for c in duplicates} == {9, 10}, "duplicate ids are kept; doc_index tells them apart"

    embedded = run_shard(ShardJob(stage="embed", shard="s0", run=run))
    vectors = pq.read_table(layout_for(run).output_path("embed", "s0"))
    assert embedded.rows_out == vectors.num_rows == len(chunks)
    matrix = np.stack(vectors.column("embedding").to_numpy(zero_copy_only=False))
    assert np.isfinite(matrix).all() and np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-5)


def test_a_five_megabyte_document_is_chunked_exactly(odd_dataset):
    run, source = odd_dataset
    downloaded(run, source, "s1")
    result = run_shard(ShardJob(stage="chunk", shard="s1", run=run))
    table = pq.read_table(layout_for(run).output_path("chunk", "s1"), columns=["char_start", "char_end", "chunk_token_count"])
    starts, ends = table.column("char_start").to_numpy(), table.column("char_end").to_numpy()
    text = pq.read_table(source / "s1.parquet").column("text")[0].as_py()
    assert result.chunks == table.num_rows > 10_000 and starts[0] == 0 and ends[-1] == len(text.rstrip())
    assert (starts[1:] < ends[:-1]).all(), "consecutive windows overlap: nothing between them is lost"
    assert table.column("chunk_token_count").to_numpy().max() <= 64


def test_a_zero_row_shard_is_done_with_no_chunks(odd_dataset):
    run, source = odd_dataset
    assert downloaded(run, source, "s2-empty").rows_out == 0
    result = run_shard(ShardJob(stage="chunk", shard="s2-empty", run=run))
    assert result.status == "done" and result.chunks == 0
    assert pq.read_metadata(layout_for(run).output_path("chunk", "s2-empty")).num_rows == 0


def test_a_non_string_text_column_fails_that_shard_with_the_reason(odd_dataset):
    run, source = odd_dataset
    downloaded(run, source, "s3-ints")
    with pytest.raises(BadDataError, match=r"s3-ints.arrow: text column 'text' has type int64, expected a string"):
        run_shard(ShardJob(stage="chunk", shard="s3-ints", run=run))


def test_the_flow_runs_every_good_shard_and_lists_the_bad_one(prefect_api, odd_dataset, capsys):
    from flows.cli import main

    run, source = odd_dataset
    (source / "s1.parquet").unlink()  # the 5 MB document has its own test; keep this run short
    code = main(["run", "--source", str(source), "--stages", "download,chunk", "--data-dir", str(run.dataset.data_dir), "--keep-columns", "", "--max-tokens", "64"])
    assert code == 1
    err = capsys.readouterr()
    assert "s3-ints" in err.err and "expected a string" in err.out
    layout = layout_for(run)
    assert sorted(p.stem for p in layout.shard_dir("chunk").glob("*.parquet")) == ["s0", "s2-empty"]


def test_a_dataset_without_its_text_column_is_refused_before_any_work(prefect_api, tmp_path, capsys):
    from flows.cli import main

    source = tmp_path / "source" / "notext"
    source.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "body": ["hello"]}), source / "s0.parquet")
    data = tmp_path / "data"
    assert main(["run", "--source", str(source), "--stages", "download,chunk", "--data-dir", str(data), "--keep-columns", ""]) == 2
    captured = capsys.readouterr()
    assert "column(s) ['text'] not found" in captured.err and "--text-column" in captured.err
    assert "Traceback" not in captured.out + captured.err, "refused by the CLI before a flow run exists"
    assert not list(data.rglob("*.arrow")) and not list(data.rglob("*.parquet")), "nothing was downloaded or chunked"
    (tmp_path / "source" / "nourl").mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "source" / "nourl" / "s0.parquet")
    assert main(["run", "--source", str(tmp_path / "source" / "nourl"), "--data-dir", str(data), "--keep-columns", "id,url"]) == 2
    assert "column(s) ['url'] not found; the shard has ['id', 'text'] (set --text-column / --keep-columns)" in capsys.readouterr().err
    (tmp_path / "source" / "empty").mkdir()
    assert main(["run", "--source", str(tmp_path / "source" / "empty"), "--data-dir", str(data)]) == 2
    assert "no shard files (.parquet, .arrow, .jsonl, .json) in" in capsys.readouterr().err
    assert not list(data.rglob("*.arrow")) and not list(data.rglob("*.parquet"))

    # Through a deployment (no CLI in front): the pipeline ends Failed holding the ConfigError, without raising.
    from fineweb_modal.errors import ConfigError
    from flows.outcome import outcome
    from flows.pipeline import pipeline

    state = pipeline(source=str(source), data_dir=str(data), stages=["download", "chunk"], keep_columns="", return_state=True)
    assert state.is_failed() and isinstance(outcome(state), ConfigError) and not list(data.rglob("*.arrow"))


def test_a_corrupt_first_source_file_does_not_stop_the_column_check_or_the_run(tmp_path):
    from fineweb_modal.config import build_run_config
    from fineweb_modal.errors import ConfigError
    from flows.stage import check_source_columns

    source = tmp_path / "source" / "mixed"
    source.mkdir(parents=True)
    (source / "a.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"id": ["x"], "body": ["hello"]}), source / "b.parquet")
    run = build_run_config(source=str(source), data_dir=str(tmp_path / "data"), keep_columns="")
    with pytest.raises(ConfigError, match=r"b.parquet: column\(s\) \['text'\] not found"):
        check_source_columns(run)
    pq.write_table(pa.table({"id": ["x"], "text": ["hello"]}), source / "b.parquet")
    check_source_columns(run)  # the corrupt file is left to fail its own shard


def _write_stream(path, texts: list[str]) -> bytearray:
    batch = pa.record_batch([pa.array(texts, pa.string()), pa.array([str(i) for i in range(len(texts))])], names=["text", "id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return bytearray(path.read_bytes())


def test_corrupt_arrow_values_fail_the_shard_instead_of_crashing_the_process(run_config_for, tmp_path):
    """Offsets out of bounds make pyarrow read wild memory (the process dies: SIGBUS/SIGSEGV), bad UTF-8 a bare
    UnicodeDecodeError: both are caught by validating each batch first, and name the file."""
    run = run_config_for(name="corrupt", stages="chunk", keep_columns="")
    layout = layout_for(run)
    offsets_shard = layout.output_path("download", "bad-offsets")
    raw = _write_stream(offsets_shard, ["abc", "defgh", "ijkl"])
    at = raw.index(struct.pack("<4i", 0, 3, 8, 12))
    raw[at + 4 : at + 8] = struct.pack("<i", 0x7FFF0000)  # a middle offset: the reader's cheap checks see only the ends
    offsets_shard.write_bytes(bytes(raw))
    utf8_shard = layout.output_path("download", "bad-utf8")
    raw = _write_stream(utf8_shard, ["abc", "de\u00e9gh", "ijkl"])
    at = raw.index("\u00e9".encode())
    raw[at : at + 2] = b"\xff\xfe"
    utf8_shard.write_bytes(bytes(raw))
    for shard, cause in (("bad-offsets", "out of bounds"), ("bad-utf8", "Invalid UTF8")):
        with pytest.raises(BadDataError, match=rf"{shard}.arrow: cannot read the Arrow shard .*{cause}"):
            run_shard(ShardJob(stage="chunk", shard=shard, run=run))
        assert not layout.output_path("chunk", shard).exists()
    with pytest.raises(BadDataError, match="bad-offsets.arrow: cannot read a sample"):  # the disk-space check and the plan sample
        sample_arrow_rows(offsets_shard, 3)


def test_a_text_column_of_only_nulls_gives_counted_empty_docs(run_config_for, tmp_path):
    """JSON lines whose texts are all null load as Arrow's null type: every document is an empty one."""
    source = tmp_path / "source" / "nulls"
    source.mkdir(parents=True)
    (source / "s0.jsonl").write_text('{"text": null, "url": "a"}\n{"text": null, "url": "b"}\n')
    run = run_config_for(source, keep_columns="url")
    run_shard(ShardJob(stage="download", shard="s0", run=run, source_file=str(source / "s0.jsonl")))
    result = run_shard(ShardJob(stage="chunk", shard="s0", run=run))
    assert result.status == "done" and (result.docs, result.empty_docs, result.chunks) == (2, 2, 0)


def test_a_save_to_disk_folder_is_a_source_without_its_metadata_files(run_config_for, tmp_path):
    """`dataset_info.json` and `state.json` beside the Arrow shards are not shards."""
    from fineweb_modal.layout import list_source_files

    source = tmp_path / "saved"
    _write_stream(source / "data-00000-of-00001.arrow", ["one document"])
    (source / "dataset_info.json").write_text("{}")
    (source / "state.json").write_text('{"_data_files": []}')
    assert [p.name for p in list_source_files(source)] == ["data-00000-of-00001.arrow"]


def test_an_unreadable_first_shard_does_not_stop_the_chunk_stages_column_check(run_config_for):
    from fineweb_modal.errors import ConfigError
    from flows.stage import _shards_and_inputs

    run = run_config_for(name="mixed", stages="chunk", keep_columns="")
    layout = layout_for(run)
    layout.output_path("download", "a").parent.mkdir(parents=True, exist_ok=True)
    layout.output_path("download", "a").write_bytes(b"not arrow at all")
    _write_stream(layout.output_path("download", "b"), ["fine"])
    assert list(_shards_and_inputs("chunk", run)) == ["a", "b"], "a fails its own task; b's columns were checked"
    bad_columns = run.model_copy(update={"chunk": run.chunk.model_copy(update={"text_column": "body"})})
    with pytest.raises(ConfigError, match=r"b.arrow: column\(s\) \['body'\] not found"):
        _shards_and_inputs("chunk", bad_columns)


def test_a_source_folder_without_shard_files_is_refused_saying_what_it_holds(tmp_path):
    from fineweb_modal.config import build_run_config
    from fineweb_modal.errors import ConfigError
    from flows.stage import check_before_work

    def refusal(source) -> str:
        with pytest.raises(ConfigError) as refused:
            check_before_work(build_run_config(source=str(source), data_dir=str(tmp_path / "data"), stages="download"))
        return str(refused.value)

    source = tmp_path / "source" / "hub-layout"
    (source / "data").mkdir(parents=True)
    assert refusal(source / "data") == f"download: no shard files (.parquet, .arrow, .jsonl, .json) in {source / 'data'}; it is empty"
    (source / "notes.txt").write_text("not a shard")
    assert refusal(source).endswith(f"in {source}; it holds data/, notes.txt")
    pq.write_table(pa.table({"text": ["hello"]}), source / "data" / "s0.parquet")
    assert refusal(source).endswith(f"(subfolders are not read: pass the folder that holds the files, e.g. {source / 'data'})")


def test_jsonl_lines_that_are_no_document_are_a_counted_skip_in_the_shard_result(run_config_for, tmp_path):
    from fineweb_modal.report import state_message

    source = tmp_path / "source" / "lines"
    source.mkdir(parents=True)
    lines = ['{"text": "good"}', '{"text": 7}', '{"text": "also good"}', '{"text": ["a", "list"]}', '["not", "an object"]']
    (source / "s0.jsonl").write_text("\n".join(lines) + "\n")
    run = run_config_for(source, keep_columns="", max_tokens=64)
    result = run_shard(ShardJob(stage="download", shard="s0", run=run, source_file=str(source / "s0.jsonl")))
    assert (result.rows_in, result.rows_out, result.docs) == (5, 2, 2) and result.extra["left_out_lines"] == [2, 4, 5]
    assert state_message(result).startswith("2 docs (3 line(s) left out)")
    _, kept, _ = sample_arrow_rows(layout_for(run).output_path("download", "s0"), 10)
    assert kept.column("text").to_pylist() == ["good", "also good"]
    again = run_shard(ShardJob(stage="download", shard="s0", run=run, source_file=str(source / "s0.jsonl")))
    assert again.status == "skipped" and state_message(again) == "skipped: done earlier (2 docs (3 line(s) left out))"

    # Which lines are documents depends on the text column: the same file read for another one is redone.
    (source / "s1.jsonl").write_text('{"text": "good"}\n{"text": "also", "body": 5}\n{"text": "\\ud800"}\n')

    def download_s1(text_column: str):
        run = run_config_for(source, keep_columns="", text_column=text_column)
        return run_shard(ShardJob(stage="download", shard="s1", run=run, source_file=str(source / "s1.jsonl")))

    assert download_s1("text").rows_out == 2
    body = download_s1("body")
    assert (body.status, body.rows_out) == ("done", 1), "not skipped as done: its kept lines differ"


def test_a_tei_that_is_down_or_serves_another_model_is_refused_before_any_work(prefect_api, demo_source, tmp_path, monkeypatch, capsys):
    """Found by one `GET /info` before download and chunk run, not by every embed shard's retries after them."""
    import time

    from fineweb_modal.models import DEFAULT_MODEL
    from flows.cli import main
    from tests.tei_double import TEITestDouble

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    data = tmp_path / "data"
    argv = ["run", "--source", str(demo_source), "--data-dir", str(data), "--max-tokens", "64", "--engine", "tei"]
    started = time.monotonic()
    assert main([*argv, "--tei-url", "http://127.0.0.1:9"]) == 2
    assert time.monotonic() - started < 60
    assert "is TEI running at --tei-url?" in capsys.readouterr().err
    double = TEITestDouble().start()
    try:
        double.served_model_id = "nomic-ai/nomic-embed-text-v1.5"
        assert main([*argv, "--tei-url", double.url]) == 2
        assert "TEI serves 'nomic-ai/nomic-embed-text-v1.5'" in capsys.readouterr().err
        assert not data.exists(), "nothing was downloaded or chunked"

        # Through a deployment (no CLI in front): the pipeline flow checks first too, and ends Failed holding the ConfigError.
        from fineweb_modal.errors import ConfigError
        from flows.outcome import outcome
        from flows.pipeline import pipeline

        flow_args = dict(source=str(demo_source), data_dir=str(data), max_tokens=64, engine="tei", tei_url=double.url, return_state=True)
        state = pipeline(**flow_args)
        assert state.is_failed() and isinstance(outcome(state), ConfigError) and not data.exists()
        double.served_model_id = DEFAULT_MODEL
        assert pipeline(**flow_args).is_completed()
    finally:
        double.stop()
    # Everything embedded: a rerun needs no TEI, so one that is gone now does not stop it.
    assert main([*argv, "--tei-url", double.url]) == 0
    assert "embed      3 ok (3 skipped), 0 failed" in capsys.readouterr().out
    # The embed stage on its own checks once it has a shard to run, before any task starts.
    from flows.embed import embed

    next(data.glob("*MiniLM*/train/data-00000-of-00003.parquet")).unlink()
    state = embed(name=demo_source.name, data_dir=str(data), max_tokens=64, engine="tei", tei_url=double.url, return_state=True)
    assert state.is_failed() and isinstance(outcome(state), ConfigError) and "is TEI running" in str(outcome(state))


def _hub_run(tmp_path, source: str, **overrides):
    from fineweb_modal.config import build_run_config

    return build_run_config(**{"source": source, "data_dir": str(tmp_path / "data"), "stages": "download,chunk", **overrides})


def test_a_hub_source_that_cannot_be_read_is_refused_before_anything_downloads(hub_api, tmp_path, caplog):
    """Through a test double of the Hub's dataset-info API: on the local backend the download would meet the same."""
    from fineweb_modal.errors import ConfigError
    from flows.stage import check_before_work, check_hub_source

    with pytest.raises(ConfigError, match=r"^download: the Hub has no dataset org/nope \(or it is private"):
        check_before_work(_hub_run(tmp_path, "org/nope"))
    with pytest.raises(ConfigError, match=r"^download: the Hub dataset org/gated is gated"):
        check_before_work(_hub_run(tmp_path, "org/gated"))
    # On Modal the download runs there, with its own network and HF_TOKEN secret: this machine's view is only a warning.
    stage_log = logging.getLogger("flows.stage")
    stage_log.addHandler(caplog.handler)  # directly: Prefect's logging setup, on its first import, replaces the root's handlers
    try:
        with caplog.at_level(logging.DEBUG, logger="flows.stage"):
            check_hub_source(_hub_run(tmp_path, "org/nope", backend="modal"))  # (check_before_work would ask Modal first)
    finally:
        stage_log.removeHandler(caplog.handler)
    assert any("could not check the Hub dataset from here (the Hub has no dataset org/nope" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "data").exists()


def test_a_hub_that_fails_just_now_or_a_download_already_done_does_not_stop_a_run(hub_api, demo_source, tmp_path, caplog):
    """A 503 is no verdict on the dataset (a warning; the download retries); a rerun whose download is done asks the Hub nothing."""
    from fineweb_modal.ledger import Ledger
    from fineweb_modal.shards import _hub_fingerprint, layout_for
    from flows.stage import check_before_work

    stage_log = logging.getLogger("flows.stage")
    stage_log.addHandler(caplog.handler)  # directly: Prefect's logging setup, on its first import, replaces the root's handlers
    try:
        with caplog.at_level(logging.DEBUG, logger="flows.stage"):
            check_before_work(_hub_run(tmp_path, "org/busy"))
    finally:
        stage_log.removeHandler(caplog.handler)
    assert any("could not check the Hub dataset from here (the Hub answered HTTP 503" in r.getMessage() for r in caplog.records)

    run = _hub_run(tmp_path, "org/nope")  # the Hub would refuse it now: its files came earlier (or from a cache)
    layout = layout_for(run)
    for path in sorted(demo_source.glob("*.parquet")):
        from fineweb_modal.download import convert_file

        rows = convert_file(path, layout.output_path("download", path.stem)).rows_out
        Ledger(layout).write_done("download", path.stem, _hub_fingerprint(run), rows, {"docs": rows}, 1)
    asked = len(hub_api.paths)
    check_before_work(run)
    assert len(hub_api.paths) == asked, "nothing will be downloaded: nothing asked"


def test_a_hub_source_without_the_split_or_columns_is_refused_from_its_first_file_header(hub_api, demo_source, tmp_path, monkeypatch):
    """`org/public` passes the Hub double's access check; a local folder stands in for its files (read by the same
    `load_dataset(..., streaming=True)` a Hub repo is)."""
    import fineweb_modal.download
    from fineweb_modal.errors import ConfigError
    from flows.stage import check_before_work

    monkeypatch.setattr(fineweb_modal.download, "hub_load_path", lambda repo_id: str(demo_source))  # org/public's files
    check_before_work(_hub_run(tmp_path, "org/public"))
    with pytest.raises(ConfigError, match=r"^hf://datasets/org/public: column\(s\) \['body'\] not found; the shard has \['text', "):
        check_before_work(_hub_run(tmp_path, "org/public", text_column="body"))
    with pytest.raises(ConfigError, match=r"Bad split: validation\. Available splits: \['train'\]"):
        check_before_work(_hub_run(tmp_path, "org/public", split="validation"))
    check_before_work(_hub_run(tmp_path, "org/public", text_column="body", stages="download"))  # no chunk: columns not needed
    assert not (tmp_path / "data").exists()


def test_the_cli_refuses_a_hub_source_it_cannot_use_in_one_line_with_exit_2(prefect_api, hub_api, demo_source, tmp_path, monkeypatch, capsys):
    """Each Hub refusal of the failure table, through the CLI: the Hub's API is its test double (`hub_api`), and
    `org/public`'s files are local folders (a plain one, then one only a dataset script could load)."""
    import fineweb_modal.download
    from flows.cli import main

    scripted = tmp_path / "scripted"
    scripted.mkdir()
    (scripted / "scripted.py").write_text("import datasets\n")
    files_of = {"org/public": demo_source}
    monkeypatch.setattr(fineweb_modal.download, "hub_load_path", lambda repo_id: str(files_of[repo_id]))
    data = tmp_path / "data"

    def refusal(source: str, *options: str) -> str:
        assert main(["run", "--source", source, "--data-dir", str(data), "--max-tokens", "64", *options]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
        return err

    assert "the Hub has no dataset org/nope (or it is private" in refusal("org/nope")
    assert "the Hub dataset org/gated is gated" in refusal("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    assert "the Hub refused the token here (HTTP 401" in refusal("org/public")
    monkeypatch.delenv("HF_TOKEN")
    assert "BuilderConfig 'nope' not found. Available: ['default']" in refusal("org/public", "--subset", "nope")
    assert "Bad split: validation. Available splits: ['train']" in refusal("org/public", "--split", "validation")
    assert "column(s) ['body'] not found" in refusal("org/public", "--text-column", "body")
    files_of["org/public"] = scripted
    assert "Dataset scripts are no longer supported, but found scripted.py" in refusal("org/public")
    assert not data.exists(), "nothing downloaded"

def test_an_unreachable_hub_is_refused_by_the_cli_in_one_line(prefect_api, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from flows.cli import main
    from flows.server import _free_port

    endpoint = f"http://127.0.0.1:{_free_port(4975)}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    _go_online(monkeypatch)
    assert main(["run", "--source", "HuggingFaceFW/fineweb-edu", "--subset", "sample-10BT", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert f"download: cannot reach the Hub at {endpoint} (ConnectError" in err
    assert "Traceback" not in err and "Retrying" not in err
    assert not (tmp_path / "data").exists()
