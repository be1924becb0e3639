"""Bad config is rejected with a message that names the value; good config resolves `auto` and fingerprints."""

from __future__ import annotations

import pytest

from fineweb_modal.config import build_run_config, resolve_max_tokens
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
        ({"dimensions": 0}, "dimensions must be a positive integer"),
    ],
)
def test_bad_config_is_rejected_with_the_reason(overrides, message):
    params = {"name": "demo", "stages": "chunk"} | overrides
    with pytest.raises(ConfigError, match=message):
        build_run_config(**params)


def test_stages_run_in_pipeline_order_and_names_derive_from_the_source(tmp_path):
    folder = tmp_path / "my-corpus"
    folder.mkdir()
    run = build_run_config(source=str(folder), stages="summarize,chunk")
    assert run.stages == ("chunk", "summarize") and run.dataset.name == "my-corpus"
    hub = build_run_config(source="HuggingFaceFW/fineweb-edu", subset="sample-10BT", stages="download")
    assert hub.dataset.name == "fineweb-edu-sample-10BT" and hub.download.source_kind == "hub"


def test_fingerprint_changes_with_what_shapes_the_output():
    base = build_run_config(name="d", stages="chunk").chunk
    assert base.fingerprint() == build_run_config(name="d", stages="chunk").chunk.fingerprint()
    assert base.fingerprint() != build_run_config(name="d", stages="chunk", overlap=0.2).chunk.fingerprint()
    assert base.fingerprint() != build_run_config(name="d", stages="chunk", max_tokens=128).chunk.fingerprint()
    assert base.tokenizer_sha256 == model_info(DEFAULT_MODEL).tokenizer_sha256


def test_embed_fingerprint_ignores_where_tei_runs():
    a = build_run_config(name="d", stages="embed", engine="tei", tei_url="http://127.0.0.1:1").embed
    b = build_run_config(name="d", stages="embed", engine="tei", tei_url="http://10.0.0.2:8080").embed
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != build_run_config(name="d", stages="embed").embed.fingerprint()
    assert a.fingerprint() != build_run_config(name="d", stages="embed", engine="tei", tei_url="http://x:1", dimensions=64).embed.fingerprint()


def test_model_slug_is_the_last_path_component():
    assert model_slug("nomic-ai/nomic-embed-text-v1.5") == "nomic-embed-text-v1.5"
    assert model_slug(DEFAULT_MODEL) == "all-MiniLM-L6-v2"
    assert model_slug("/models/bge-small/") == "bge-small"
