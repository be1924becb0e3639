"""What the project reads from a model's folder."""

from __future__ import annotations

import json

import pytest

from fineweb_modal.models import DEFAULT_MODEL, hidden_size, model_info


@pytest.mark.parametrize(("config", "width"), [({"hidden_size": 384}, 384), ({"n_embd": 768}, 768), ({"d_model": 512}, 512), ({}, None)])
def test_the_vector_width_is_read_from_bert_and_nomic_bert_configs(tmp_path, config, width):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hidden_size(str(tmp_path)) == width


def test_the_bundled_model_is_384_wide():
    assert hidden_size(model_info(DEFAULT_MODEL).path) == 384
