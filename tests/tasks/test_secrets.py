"""Credentials from the environment, else from Prefect Secret blocks: which wins, and what a block may hold."""

from __future__ import annotations

import os

import pytest
from prefect.blocks.system import Secret

from fineweb_modal.errors import ConfigError
from tasks.secrets import TEI_API_KEY_BLOCK, TEI_API_KEY_ENV, load_tei_api_key, secret_value


@pytest.fixture
def secret_block(prefect_api):
    """Save Secret blocks by name for one test; delete them after (the Prefect server is the session's)."""
    saved = []

    def save(name: str, value) -> None:
        Secret(value=value).save(name, overwrite=True)
        saved.append(name)

    yield save
    for name in saved:
        Secret.delete(name)


def test_the_environment_wins_then_the_block_then_none(secret_block, monkeypatch):
    monkeypatch.delenv("FM_TEST_KEY", raising=False)
    assert secret_value("FM_TEST_KEY", "fm-test-key") is None, "no variable, no block"
    secret_block("fm-test-key", "from-the-block\n")
    assert secret_value("FM_TEST_KEY", "fm-test-key") == "from-the-block", "stripped: no header carries a newline"
    monkeypatch.setenv("FM_TEST_KEY", "  ")
    assert secret_value("FM_TEST_KEY", "fm-test-key") == "from-the-block", "a blank variable is no credential"
    monkeypatch.setenv("FM_TEST_KEY", "from-the-environment")
    assert secret_value("FM_TEST_KEY", "fm-test-key") == "from-the-environment"
    secret_block("fm-test-blank", "   ")
    assert secret_value("FM_UNSET_KEY", "fm-test-blank") is None


def test_the_tei_key_is_put_in_the_environment_from_its_block(secret_block, monkeypatch):
    monkeypatch.setenv(TEI_API_KEY_ENV, "")  # recorded first, so the key put there below is removed after the test
    monkeypatch.delenv(TEI_API_KEY_ENV)
    assert load_tei_api_key() is False and TEI_API_KEY_ENV not in os.environ
    secret_block(TEI_API_KEY_BLOCK, "tei-FromTheBlock")
    assert load_tei_api_key() is True and os.environ[TEI_API_KEY_ENV] == "tei-FromTheBlock"


def test_the_hub_token_comes_from_its_block_or_publishing_is_refused(secret_block, monkeypatch):
    from flows.publish import _hf_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="set HF_TOKEN or create the Prefect Secret block 'hf-token'"):
        _hf_token()
    secret_block("hf-token", "hf_FromTheBlock\r\n")
    assert _hf_token() == "hf_FromTheBlock"
