"""Source files of every supported type become Arrow stream shards that `datasets.load_from_disk` reads."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fineweb_modal.download import convert_file, write_dataset_index
from fineweb_modal.errors import BadDataError
from fineweb_modal.storage import open_arrow_batches
from tests.conftest import _go_online, write_arrow_shard, write_parquet

ROWS = [{"text": f"document {i}", "id": str(i), "score": i / 10} for i in range(5)]


def test_parquet_jsonl_and_arrow_sources_convert(tmp_path):
    sources = [
        write_parquet(tmp_path / "src" / "a.parquet", ROWS),
        write_arrow_shard(tmp_path / "src" / "b.arrow", ROWS),
    ]
    jsonl = tmp_path / "src" / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS))
    sources.append(jsonl)
    out = tmp_path / "data" / "d" / "train"
    for source in sources:
        assert convert_file(source, out / f"{source.stem}.arrow").rows_out == 5
        schema, batches = open_arrow_batches(out / f"{source.stem}.arrow")
        assert pa.Table.from_batches(list(batches), schema).to_pylist() == ROWS
    assert write_dataset_index(out, "train")
    from datasets import load_from_disk

    dataset = load_from_disk(str(out))
    assert dataset.num_rows == 15 and dataset[7]["text"] == "document 2"


@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".jsonl"])
def test_corrupt_source_is_bad_data_naming_the_file(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".parquet":
        write_parquet(good, ROWS * 100)
    elif suffix == ".arrow":
        write_arrow_shard(good, ROWS * 100)
    else:
        good.write_text("\n".join(json.dumps(r) for r in ROWS * 100))
    bad = tmp_path / f"bad{suffix}"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if suffix != ".jsonl" else data[: len(data) // 2] + b"{{{")
    with pytest.raises(BadDataError, match=str(bad)):
        convert_file(bad, tmp_path / "out" / "bad.arrow")
    assert not (tmp_path / "out" / "bad.arrow").exists()
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_parquet_read_back_is_identical(tmp_path):
    source = write_parquet(tmp_path / "a.parquet", ROWS)
    convert_file(source, tmp_path / "a.arrow")
    schema, batches = open_arrow_batches(tmp_path / "a.arrow")
    assert pa.Table.from_batches(list(batches), schema).equals(pq.read_table(source))


@pytest.mark.parametrize("keep_cache", [True, False])
def test_a_dataset_download_keeps_or_deletes_what_load_dataset_cached(tmp_path, demo_source, monkeypatch, keep_cache, folder_as_hub_repo):
    """A local folder stands in for a Hub repo (no Hub here): the same load_dataset + save_to_disk path."""
    import datasets

    from fineweb_modal.download import download_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    docs = sum(pq.read_metadata(p).num_rows for p in demo_source.glob("*.parquet"))
    (tmp_path / "data").mkdir()
    rows = download_hub(str(demo_source), None, "train", tmp_path / "data" / "train", num_proc=1, keep_cache=keep_cache)
    assert sum(rows.values()) == docs and all((tmp_path / "data" / "train" / f"{shard}.arrow").is_file() for shard in rows)
    cached = list((tmp_path / "hf-datasets").rglob("*.arrow"))
    assert bool(cached) == keep_cache, "the Arrow cache is kept for a local run, deleted on Modal"


def test_jsonl_lines_that_are_no_document_are_left_out_and_counted(tmp_path):
    """pyarrow refuses the whole file for one such line; the rest of the shard is kept, each line left out is numbered."""
    source = tmp_path / "s.jsonl"
    lines = [
        '{"text": "one", "url": "a"}',
        '{"text": "lone \\ud800 surrogate", "url": "b"}',
        "",
        '{"text": 5, "url": "c"}',
        '["not", "an", "object"]',
        '{"text": null, "url": "d"}',
        '{"text": "two", "url": "e", "extra": 1}',
    ]
    source.write_text("\n".join(lines) + "\n")
    converted = convert_file(source, tmp_path / "s.arrow")
    assert (converted.rows_in, converted.rows_out, converted.left_out_lines) == (6, 3, [2, 4, 5])
    assert "line 2" in converted.left_out_reason and "Unicode" in converted.left_out_reason
    schema, batches = open_arrow_batches(tmp_path / "s.arrow")
    rows = pa.Table.from_batches(list(batches), schema).to_pylist()
    assert [r["url"] for r in rows] == ["a", "d", "e"] and schema.field("text").type == pa.string()
    assert rows[2]["extra"] == 1 and rows[0]["extra"] is None, "a column first seen on a later line is kept"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"holds no document \(an empty file\)"),
        ('{"text": 1}\n[2]\n', r"holds no document \(2 line\(s\) left out; line 1: 'text' is a number"),
        ('{"text": 1}\n{"text": 2.5}\n', r"holds no document \(2 line\(s\) left out; line 1: 'text' is a number"),
        ('{"text": "a"}\n{"text": "b\n', r"line 2 is not valid JSON \(Invalid control character at column 12\)$"),
        ('{"text": "a", "n": 1}\n{"text": "b", "n": "x"}\n', r"Column\(/n\) changed from number to string\)$"),
    ],
)
def test_a_jsonl_file_that_cannot_be_a_shard_is_bad_data_naming_why(tmp_path, content, message):
    source = tmp_path / "s.jsonl"
    source.write_text(content)
    with pytest.raises(BadDataError, match=message):
        convert_file(source, tmp_path / "s.arrow")
    assert not (tmp_path / "s.arrow").exists()


def test_a_jsonl_file_read_line_by_line_gets_the_same_column_types_as_any_other(tmp_path):
    """A 3.5 MB line (across two of pyarrow's 1 MiB blocks) sends a valid file down the line-by-line path: its shard must
    not differ in schema from its siblings', or `load_from_disk` and the published dataset break."""
    import pyarrow.json as pa_json

    row = {"text": "short", "date": "2013-05-18T07:12:05Z", "score": 2.5, "int_score": 3}
    plain, long = tmp_path / "plain.jsonl", tmp_path / "long.jsonl"
    plain.write_text(json.dumps(row) + "\n")
    long.write_text(json.dumps(row) + "\n" + json.dumps({**row, "text": "word " * 700_000}) + "\n")
    with pytest.raises(pa.ArrowInvalid):
        pa_json.read_json(long)  # what sends it down that path
    assert convert_file(plain, tmp_path / "plain.arrow").rows_out == 1 and convert_file(long, tmp_path / "long.arrow").rows_out == 2
    schemas = [open_arrow_batches(tmp_path / f"{name}.arrow")[0] for name in ("plain", "long")]
    assert schemas[0] == schemas[1] and schemas[0].field("date").type == pa.timestamp("s")


@pytest.mark.parametrize(
    ("repo_id", "token", "problem", "settled"),
    [
        ("org/public", None, None, None),
        ("org/gated", None, "the Hub dataset org/gated is gated: accept its terms", True),
        ("org/nope", None, "the Hub has no dataset org/nope (or it is private", True),
        ("org/public", "hf_bad", "the Hub refused the token here (HTTP 401", True),
        ("org/busy", None, "the Hub answered HTTP 503 for the dataset org/busy", False),
    ],
)
def test_hub_access_problem_says_why_a_hub_dataset_cannot_be_read(hub_api, monkeypatch, repo_id, token, problem, settled):
    from fineweb_modal.download import hub_access_problem

    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    said = hub_access_problem(repo_id)
    if problem is None:
        assert said is None
        return
    assert said.message.startswith(problem) and said.settled is settled
    assert "hf_bad" not in said.message, "a token never reaches a message"
    if repo_id == "org/gated":
        assert hub_api.paths[-1].startswith("/api/datasets/org/gated/auth-check"), "a gated dataset's info answers; its access check says"


def test_a_hub_that_does_not_answer_is_named_with_its_address(monkeypatch):
    import huggingface_hub.constants

    from fineweb_modal.download import hub_access_problem
    from flows.server import _free_port

    endpoint = f"http://127.0.0.1:{_free_port(4970)}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    _go_online(monkeypatch)
    said = hub_access_problem("org/public")
    assert said.settled and said.message.startswith(f"cannot reach the Hub at {endpoint} (ConnectError") and said.message.endswith("set HF_HUB_OFFLINE=1")


def test_hub_schema_reads_the_columns_and_names_the_splits(demo_source, folder_as_hub_repo):
    """A local folder stands in for a Hub repo (no Hub here): `load_dataset(..., streaming=True)` reads both alike."""
    from fineweb_modal.download import hub_schema
    from fineweb_modal.errors import ConfigError

    schema = hub_schema(str(demo_source), None, "train")
    assert schema.names == pq.read_schema(next(demo_source.glob("*.parquet"))).names
    with pytest.raises(ConfigError, match=r"Bad split: tran\. Available splits: \['train'\]"):
        hub_schema(str(demo_source), None, "tran")
    with pytest.raises(ConfigError, match=r"\(subset nosuch\): BuilderConfig 'nosuch' not found"):
        hub_schema(str(demo_source), "nosuch", "train")


def test_a_hub_schema_is_asked_again_after_a_minute(tmp_path, folder_as_hub_repo, monkeypatch):
    """A `serve` process lives for days: a dataset that gained the column an earlier run was refused for is seen."""
    from fineweb_modal import download

    repo = tmp_path / "repo"
    repo.mkdir()
    pq.write_table(pa.table({"body": ["hello"]}), repo / "s0.parquet")
    assert download.hub_schema(str(repo), None, "train").names == ["body"]
    pq.write_table(pa.table({"body": ["hello"], "text": ["hello"]}), repo / "s0.parquet")
    assert download.hub_schema(str(repo), None, "train").names == ["body"], "one run's checks share one answer"
    monkeypatch.setattr(download, "HUB_ANSWER_TTL_S", 0.0)  # the minute has passed
    assert download.hub_schema(str(repo), None, "train").names == ["body", "text"]

def test_a_hub_id_is_read_from_the_hub_even_where_a_local_folder_has_its_name(demo_source, tmp_path, monkeypatch):
    """`hf://org/name` exists for that case: `load_dataset("org/name")` would read the folder instead."""
    import shutil

    from fineweb_modal.download import download_hub, hub_schema

    shutil.copytree(demo_source, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    import datasets

    assert datasets.load_dataset("org/name", split="train", streaming=True).features is not None, "a plain id: the folder, taken as the dataset"
    with pytest.raises(ConnectionError, match="Couldn't reach 'org/name' on the Hub"):  # the suite is offline: the Hub, not the folder
        hub_schema("org/name", None, "train")
    with pytest.raises(ConnectionError, match="Couldn't reach 'org/name' on the Hub"):
        download_hub("org/name", None, "train", tmp_path / "data" / "train", num_proc=1)
