"""Bad config is rejected with a message that names the value; good config resolves `auto` and fingerprints."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from fineweb_modal.chunking import chunk_schema
from fineweb_modal.config import CHUNK_COLUMNS, STAGES, build_run_config, resolve_max_tokens
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL, model_info, model_slug


def test_auto_max_tokens_is_the_models_limit_capped_at_500():
    assert model_info(DEFAULT_MODEL).sequence_limit == 256
    assert resolve_max_tokens("auto", DEFAULT_MODEL, "") == 256
    prefix_tokens = 4  # "search_document: " → search _ document :
    assert resolve_max_tokens("auto", DEFAULT_MODEL, "search_document: ") == 256 - prefix_tokens


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"overlap": 0.6}, r"overlap=0.6 is outside \[0, 0.5\]"),
        ({"overlap": -0.1}, r"overlap=-0.1 is outside"),
        ({"max_tokens": 8}, "below the minimum of 16"),
        ({"max_tokens": 300}, "at most 256"),
        ({"max_tokens": 254, "prefix": "search_document: "}, "prefix takes 4, so at most 252"),
        ({"max_tokens": "lots"}, "'auto' or an integer"),
        ({"model": "/no/such/model"}, "unknown model '/no/such/model'"),
        ({"model": "nobody/no-such-model-xyz"}, "unknown model 'nobody/no-such-model-xyz'"),
        ({"stages": "chunk,embedd"}, r"unknown stage\(s\) \['embedd'\]"),
        ({"backend": "cloud"}, "backend must be one of"),
        ({"name": "a/b"}, "must be a plain name"),
        ({"source": "not-a-folder-or-hub-id"}, "neither an existing folder nor a Hub id"),
        ({"name": None, "stages": "download"}, "download stage needs --source"),
        ({"engine": "onnx"}, "engine must be one of"),
        ({"engine": "tei"}, "needs --tei-url"),
        ({"engine": "tei", "tei_url": "localhost:8080"}, "must be an http"),
        ({"tei_url": "http://127.0.0.1:8080"}, "only used with --engine tei"),
        ({"embedding_dtype": "int8"}, "embedding_dtype must be one of"),
        ({"compile": "yes"}, "compile must be one of"),
        ({"engine": "tei", "tei_url": "http://127.0.0.1:8080", "compile": "on"}, "compile=on is for the transformers engine"),
        ({"dimensions": 0}, "dimensions must be a positive integer"),
        ({"prefix": "word " * 250}, r"leaving -?\d+ for a chunk \(at least 16\)"),
        ({"name": ".."}, "must be a plain name"),
        ({"prefix": "passage"}, r"ends inside a word.*e.g. 'passage: '"),
        ({"split": "."}, "must be a plain name"),
        ({"keep_columns": "url,chunk_text"}, r"keep_columns \['chunk_text'\] would clash"),
        ({"keep_columns": "url,url"}, r"keep_columns names \['url'\] more than once"),
        ({"keep_columns": "url,embedding"}, r"keep_columns \['embedding'\] would clash"),
        ({"max_cost": float("nan")}, "must be a number of dollars"),
        ({"backend": "modal", "engine": "tei", "tei_url": "http://127.0.0.1:8080"}, "--tei-url is for the local backend"),
        ({"engine": "tei", "backend": "modal", "tei_served_model": "/repository"}, "it needs --tei-url"),
        ({"shards": ""}, "shards='' names no shard: leave it out to run every shard"),  # `--shards "$FAILED"`, nothing in it
        ({"shards": " , "}, "names no shard"),
        ({"shards": [""]}, "names no shard"),  # a deployment's list with one blank item
    ],
)
def test_bad_config_is_rejected_with_the_reason(overrides, message):
    params = {"name": "demo", "stages": "chunk"} | overrides
    with pytest.raises(ConfigError, match=message):
        build_run_config(**params)


def test_no_shards_given_means_every_shard():
    assert build_run_config(name="demo", stages="chunk").shards == build_run_config(name="demo", stages="chunk", shards=[]).shards == ()


def test_a_tei_url_with_a_secret_in_it_is_refused_without_showing_it():
    for url in ("https://me:s3cr3t@tei.example:8080", "https://tei.example/?api_key=s3cr3t"):
        with pytest.raises(ConfigError, match="no credentials") as refused:
            build_run_config(name="demo", stages="embed", engine="tei", tei_url=url)
        assert "s3cr3t" not in str(refused.value)


def test_a_model_folder_on_this_machine_is_refused_for_modal():
    from fineweb_modal.models import DEFAULT_MODEL, resolve_model_path

    folder = str(resolve_model_path(DEFAULT_MODEL))
    assert build_run_config(name="demo", stages="chunk", model=folder).chunk.model == folder, "fine locally"
    with pytest.raises(ConfigError, match="a folder on this machine, which Modal's containers do not have"):
        build_run_config(name="demo", stages="chunk", backend="modal", model=folder)


def test_a_mistyped_local_folder_is_not_taken_as_a_hub_id_nor_a_file_as_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    with pytest.raises(ConfigError, match=r"source 'src/does-not-exist': no such folder .*src/ is a folder here; for the Hub dataset write hf://src/does-not-exist\)"):
        build_run_config(source="src/does-not-exist", stages="download")
    assert build_run_config(source="HuggingFaceFW/fineweb-edu", stages="download").download.source_kind == "hub"
    for spelt in ("hf://src/does-not-exist", "hf://datasets/src/does-not-exist"):
        run = build_run_config(source=spelt, stages="download")
        assert (run.download.source_kind, run.download.source, run.dataset.name) == ("hub", "src/does-not-exist", "does-not-exist")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="data_dir 'afile' is a file, not a folder"):
        build_run_config(name="demo", stages="chunk", data_dir="afile")


def test_keeping_the_source_id_is_what_the_chunk_id_already_does():
    run = build_run_config(name="demo", stages="chunk", keep_columns="id,url")
    assert run.chunk.keep_columns == ("url",)
    schema = chunk_schema(pa.schema([("text", pa.string()), ("url", pa.string())]), run.chunk)
    assert tuple(schema.names) == (*CHUNK_COLUMNS, "url")


def test_stages_run_in_pipeline_order_and_names_derive_from_the_source(tmp_path):
    folder = tmp_path / "my-corpus"
    folder.mkdir()
    run = build_run_config(source=str(folder), stages="summarize,chunk")
    assert run.stages == ("chunk", "summarize") and run.dataset.name == "my-corpus"
    hub = build_run_config(source="HuggingFaceFW/fineweb-edu", subset="sample-10BT", stages="download")
    assert hub.dataset.name == "fineweb-edu-sample-10BT" and hub.download.source_kind == "hub"
    with pytest.raises(ConfigError, match="subset 'sample-10BT' is for a Hub dataset"):
        build_run_config(source=str(folder), subset="sample-10BT", stages="download")


def test_fingerprint_changes_with_what_shapes_the_output():
    base = build_run_config(name="d", stages="chunk").chunk
    assert base.fingerprint() == build_run_config(name="d", stages="chunk").chunk.fingerprint()
    assert base.fingerprint() != build_run_config(name="d", stages="chunk", overlap=0.2).chunk.fingerprint()
    assert base.fingerprint() != build_run_config(name="d", stages="chunk", max_tokens=128).chunk.fingerprint()
    assert base.tokenizer_sha256 == model_info(DEFAULT_MODEL).tokenizer_sha256


def test_embed_fingerprint_ignores_where_tei_runs():
    a = build_run_config(name="d", stages="embed", engine="tei", tei_url="http://127.0.0.1:1").embed
    b = build_run_config(name="d", stages="embed", engine="tei", tei_url="http://10.0.0.2:8080", tei_served_model="/repository").embed
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != build_run_config(name="d", stages="embed").embed.fingerprint()
    assert a.fingerprint() != build_run_config(name="d", stages="embed", engine="tei", tei_url="http://x:1", dimensions=64).embed.fingerprint()


def test_model_slug_is_the_last_path_component():
    assert model_slug("nomic-ai/nomic-embed-text-v1.5") == "nomic-embed-text-v1.5"
    assert model_slug(DEFAULT_MODEL) == "all-MiniLM-L6-v2"
    assert model_slug("/models/bge-small/") == "bge-small"


# --- the validator, property-tested: every combination is either a valid config or a ConfigError naming a bad value


def _invalid_fields(p: dict) -> dict[str, tuple[str, ...]]:
    """An independent oracle: which parameters of `p` are invalid, each with words its error message must contain."""
    bad: dict[str, tuple[str, ...]] = {}
    stages = [s.strip() for s in p["stages"].split(",") if s.strip()]
    if not stages or any(s not in STAGES for s in stages):
        bad["stages"] = ("stage",)
    if p["backend"] not in ("local", "modal"):
        bad["backend"] = ("backend",)
    if p["engine"] not in ("transformers", "tei"):
        bad["engine"] = ("engine",)
    elif p["engine"] == "tei" and p["backend"] == "local" and not p["tei_url"]:
        bad["tei"] = ("tei",)
    if p["tei_url"] and not p["tei_url"].startswith(("http://", "https://")):
        bad["tei_url"] = ("tei_url",)
    elif p["tei_url"] and ("@" in p["tei_url"] or "?" in p["tei_url"]):
        bad["tei_url"] = ("tei_url", "credentials")
    elif p["tei_url"] and p["engine"] != "tei":
        bad["tei_url"] = ("tei",)
    elif p["tei_url"] and p["backend"] == "modal":
        bad["tei_url"] = ("local backend",)
    cost = p["max_cost"]
    if cost is not None and (not isinstance(cost, (int, float)) or cost < 0):
        bad["max_cost"] = ("max_cost",)
    if p["only"] not in (None, "", "failed"):
        bad["only"] = ("only",)
    if p["embedding_dtype"] not in ("float32", "float16"):
        bad["embedding_dtype"] = ("embedding_dtype",)
    if p["compile"] not in ("auto", "on", "off") or (p["compile"] == "on" and p["engine"] == "tei"):
        bad["compile"] = ("compile",)
    dims = p["dimensions"]
    if dims is not None and (not str(dims).isdigit() or int(dims) < 1 or int(dims) > 384):
        bad["dimensions"] = ("dimensions",)
    overlap = p["overlap"]
    if not isinstance(overlap, (int, float)) or not 0 <= overlap <= 0.5:
        bad["overlap"] = ("overlap",)
    if not p["text_column"]:
        bad["text_column"] = ("text_column",)
    if not p["split"] or not re.match(r"^[\w.-]+$", p["split"]):
        bad["split"] = ("split",)
    if not p["name"] or not re.match(r"^[\w.-]+$", p["name"]):
        bad["name"] = ("name",)
    if "download" in stages:
        bad["source"] = ("source",)  # no source is given in these examples
    tokens = p["max_tokens"]
    if tokens != "auto" and (not str(tokens).lstrip("-").isdigit() or not 16 <= int(tokens) <= 256):
        bad["max_tokens"] = ("max_tokens",)
    return bad


def _parameters():
    """A valid combination with none, one or two of its values replaced by a wrong one (or a wrong pairing)."""
    from hypothesis import strategies as st

    valid = {
        "stages": st.lists(st.sampled_from(STAGES[1:]), min_size=1, max_size=3).map(",".join),
        "backend": st.sampled_from(["local", "modal"]),
        "engine": st.just("transformers"),
        "tei_url": st.none(),
        "max_cost": st.one_of(st.none(), st.floats(0, 100, allow_nan=False)),
        "only": st.sampled_from([None, "", "failed"]),
        "embedding_dtype": st.sampled_from(["float32", "float16"]),
        "compile": st.sampled_from(["auto", "on", "off"]),
        "dimensions": st.one_of(st.none(), st.integers(1, 384), st.just("64")),
        "overlap": st.floats(0, 0.5, allow_nan=False),
        "text_column": st.sampled_from(["text", "body"]),
        "split": st.sampled_from(["train", "validation", "test.v2"]),
        "name": st.sampled_from(["demo", "fineweb-edu_10BT.v2"]),
        "max_tokens": st.one_of(st.just("auto"), st.integers(16, 256)),
    }
    wrong = {
        "stages": st.sampled_from(["", "embedd", "chunk,summary", "download", " , "]),
        "backend": st.sampled_from(["", "cloud", "Local", "ünïcode"]),
        "engine": st.sampled_from(["", "onnx", "TEI", "tei"]),  # plain tei is wrong only without a URL on the local backend
        # A good URL is wrong without --engine tei; one with a key in it is always wrong (it would show in the UI).
        "tei_url": st.sampled_from(["ftp://x", "localhost:8080", "http://127.0.0.1:8080", "http://me:secret@tei:8080", "https://tei/?api_key=x"]),
        "max_cost": st.one_of(st.floats(-100, -0.01), st.sampled_from(["five", ""])),
        "only": st.sampled_from(["missing", "FAILED", "all"]),
        "embedding_dtype": st.sampled_from(["int8", "bf16", ""]),
        "compile": st.sampled_from(["yes", "", "ON", None]),
        "dimensions": st.one_of(st.integers(-5, 0), st.integers(385, 5000), st.sampled_from(["abc", "1.5"])),
        "overlap": st.one_of(st.floats(-1, -0.001), st.floats(0.501, 5), st.sampled_from(["0.1x"])),
        "text_column": st.just(""),
        "split": st.sampled_from(["", "a b", "../x"]),
        "name": st.sampled_from(["bad name", "../up", "a/b", ""]),
        "max_tokens": st.one_of(st.integers(-10, 15), st.integers(257, 10_000), st.sampled_from(["12x", "", "auto-ish"])),
    }

    @st.composite
    def combination(draw):
        params = {field: draw(strategy) for field, strategy in valid.items()}
        for field in draw(st.sets(st.sampled_from(sorted(wrong)), max_size=2)):
            params[field] = draw(wrong[field])
        return params

    return combination()


def test_the_validator_accepts_exactly_the_valid_combinations(tmp_path):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_parameters())
    def check(params):
        bad = _invalid_fields(params)
        try:
            run = build_run_config(data_dir=str(tmp_path / "data"), **params)
        except ConfigError as exc:
            assert bad, f"rejected a valid combination: {exc}"
            message = str(exc).lower()
            assert any(word in message for words in bad.values() for word in words), f"{exc!s} names none of {sorted(bad)}"
            return
        assert not bad, f"accepted invalid {sorted(bad)}"
        assert run.backend == params["backend"] and run.embed.embedding_dtype == params["embedding_dtype"]
        assert run.embed.compile == params["compile"]

    check()
