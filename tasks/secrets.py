"""Credentials from the environment or Prefect Secret blocks, never from flow parameters (those are stored and shown)."""

from __future__ import annotations

import os

TEI_API_KEY_ENV = "TEI_API_KEY"
TEI_API_KEY_BLOCK = "tei-api-key"


def load_tei_api_key() -> bool:
    """Make TEI's API key available to the engine: `TEI_API_KEY` if set, else the Prefect Secret `tei-api-key`.

    Returns whether a key is available. The key goes into this process's environment only, never a log.
    """
    if os.environ.get(TEI_API_KEY_ENV):
        return True
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(TEI_API_KEY_BLOCK)
    except ValueError:  # no such block: the server needs no key
        return False
    os.environ[TEI_API_KEY_ENV] = secret.get()
    return True
