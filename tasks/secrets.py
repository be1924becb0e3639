"""Credentials from the environment or Prefect Secret blocks, never from flow parameters (those are stored and shown)."""

from __future__ import annotations

import os

TEI_API_KEY_ENV = "TEI_API_KEY"
TEI_API_KEY_BLOCK = "tei-api-key"
HF_TOKEN_ENV = "HF_TOKEN"
HF_TOKEN_BLOCK = "hf-token"


def secret_value(env: str, block: str) -> str | None:
    """The credential in the environment variable `env`, else in the Prefect Secret block `block`, else None.

    Stripped: a token pasted from a file keeps its newline, which no HTTP header can carry.
    """
    if value := os.environ.get(env, "").strip():
        return value
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block).get()
    except ValueError:  # no such block
        return None
    return str(value).strip() or None


def load_tei_api_key() -> bool:
    """Make TEI's API key available to the engine: `TEI_API_KEY` if set, else the Prefect Secret `tei-api-key`.

    Returns whether a key is available. The key goes into this process's environment only, never a log.
    """
    key = secret_value(TEI_API_KEY_ENV, TEI_API_KEY_BLOCK)
    if key is not None:
        os.environ[TEI_API_KEY_ENV] = key
    return key is not None
