"""What the project reads from a model's folder, and the sentence-transformers pipelines it refuses to half-run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fineweb_modal.config import build_run_config
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL, hidden_size, model_info

BUNDLED = Path(model_info(DEFAULT_MODEL).path)
MODULES = json.loads((BUNDLED / "modules.json").read_text())
POOLING = json.loads((BUNDLED / "1_Pooling" / "config.json").read_text())


def model_variant(tmp_path: Path, replaced: dict[str, object]) -> str:
    """The bundled model's folder, linked file by file, with some JSON files replaced (or added)."""
    target = tmp_path / "variant"
    for path in BUNDLED.rglob("*"):
        if path.is_file() and str(path.relative_to(BUNDLED)) not in replaced:
            (target / path.relative_to(BUNDLED)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(BUNDLED)).symlink_to(path)
    for name, content in replaced.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(json.dumps(content))
    return str(target)


@pytest.mark.parametrize(("config", "width"), [({"hidden_size": 384}, 384), ({"n_embd": 768}, 768), ({"d_model": 512}, 512), ({}, None)])
def test_the_vector_width_is_read_from_bert_and_nomic_bert_configs(tmp_path, config, width):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hidden_size(str(tmp_path)) == width


def test_the_bundled_model_is_384_wide_mean_pooled():
    info = model_info(DEFAULT_MODEL)
    assert hidden_size(info.path) == 384 and info.pooling == "mean" and info.pooling_includes_prompt


def test_vectors_are_unit_length_when_the_pipeline_has_no_normalize_module(tmp_path):
    """nomic-embed-text-v1.5's pipeline ends at Pooling: the stored vectors still promise unit length."""
    from fineweb_modal.embedding import TransformersEngine

    path = model_variant(tmp_path, {"modules.json": [m for m in MODULES if not m["type"].endswith("Normalize")]})
    for dims in (None, 128):
        vectors = TransformersEngine(path, dimensions=dims).embed(["an unnormalized mean is about 6 long", "short"])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("replaced", "message"),
    [
        ({"modules.json": [*MODULES[:2], {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]}, r"has \['sentence_transformers.models.Dense'\]"),
        ({"1_Pooling/config.json": {**POOLING, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}}, r"pools with \['pooling_mode_max_tokens'\]"),
        ({"1_Pooling/config.json": {**POOLING, "pooling_mode_cls_token": True}}, "exactly one of cls, mean or last"),
    ],
)
def test_pipelines_this_engine_would_half_run_are_refused(tmp_path, replaced, message):
    with pytest.raises(ConfigError, match=message):
        model_info(model_variant(tmp_path, replaced))


def test_a_pooling_folder_named_in_modules_json_is_read(tmp_path):
    modules = [MODULES[0], {**MODULES[1], "path": "pool"}, MODULES[2]]
    path = model_variant(tmp_path, {"modules.json": modules, "pool/config.json": {**POOLING, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}})
    assert model_info(path).pooling == "cls"


def test_a_prefix_the_pooling_leaves_out_is_refused(tmp_path):
    path = model_variant(tmp_path, {"1_Pooling/config.json": {**POOLING, "include_prompt": False}})
    build_run_config(name="d", stages="chunk", model=path)  # no prefix: fine
    with pytest.raises(ConfigError, match="include_prompt: false"):
        build_run_config(name="d", stages="chunk", model=path, prefix="query: ")


def test_lowercasing_before_a_cased_tokenizer_is_refused(tmp_path):
    tokenizer = json.loads((BUNDLED / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    replaced = {"sentence_bert_config.json": {"max_seq_length": 256, "do_lower_case": True}, "tokenizer.json": tokenizer}
    with pytest.raises(ConfigError, match="lowercases its input before its \\(cased\\) tokenizer"):
        model_info(model_variant(tmp_path, replaced))
    assert model_info(model_variant(tmp_path / "uncased", {"sentence_bert_config.json": {"max_seq_length": 256, "do_lower_case": True}})).pooling == "mean"
