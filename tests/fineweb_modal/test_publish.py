"""Before an upload: whether the Hub token can publish the repo from here (the joined files and card: tests/flows/test_publish.py)."""

from __future__ import annotations

import pytest

from fineweb_modal.publish import hub_write_problem, upload_may_pass_again


@pytest.mark.parametrize(
    ("repo_id", "token", "problem"),
    [
        ("me/embeddings", "hf_write", None),
        ("team/embeddings", "hf_write", None),
        ("someone-else/embeddings", "hf_write", "the Hub token is me's, who cannot create datasets under 'someone-else' (it can under: me, team)"),
        ("me/embeddings", "hf_read", "the Hub token of me is read-only: publishing needs a token with write access"),
        ("me/embeddings", "hf_bad", "the Hub refused the token (HTTP 401: invalid credentials)"),
        ("Me/embeddings", "hf_write", None),  # owners compared as the Hub's create_repo would: not by case
        ("me/embeddings", "hf_app", None),  # an app's token: whom it writes for is the Hub's to say
        ("me/embeddings", "hf_nulls", None),  # null fields: read as absent, not a crash
        ("other/embeddings", "hf_nulls", "the Hub token is me's, who cannot create datasets under 'other' (it can under: me)"),
        ("me/embeddings", "hf_proxy_page", None),  # a 200 that is no JSON: the upload will say what is wrong
    ],
)
def test_the_token_is_asked_who_it_is_before_an_upload(hub_api, repo_id, token, problem):
    said = hub_write_problem(repo_id, token)
    assert said == problem if problem is None else said.startswith(problem)
    assert hub_api.paths.count("/api/whoami-v2") == 1


def test_a_token_no_header_can_carry_is_said_without_showing_it(hub_api):
    said = hub_write_problem("me/embeddings", "hf_SEC\nRET")
    assert said == "the Hub token cannot be sent (LocalProtocolError): check HF_TOKEN or the Prefect Secret block 'hf-token'"


def test_a_token_pasted_with_its_newline_is_used_without_it(monkeypatch):
    from flows.publish import _hf_token

    monkeypatch.setenv("HF_TOKEN", "hf_write\r\n")
    assert _hf_token() == "hf_write"


def test_an_unreachable_hub_is_said_in_a_line_at_once(hub_api, monkeypatch):
    import socket
    import time

    import huggingface_hub.constants

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    started = time.monotonic()
    said = hub_write_problem("me/embeddings", "hf_write")
    assert said.startswith(f"cannot reach the Hub at {endpoint} (ConnectError:") and said.endswith("check the network, then rerun")
    assert time.monotonic() - started < 5, "no retries with backoff"
    assert "hf_write" not in said


class _HubAnswered(Exception):
    """Stands in for huggingface_hub's HfHubHTTPError: an error carrying the Hub's response."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.response = type("Response", (), {"status_code": status})()


def test_an_upload_is_tried_again_only_when_it_may_pass():
    import httpx

    assert upload_may_pass_again(_HubAnswered(429)) and upload_may_pass_again(_HubAnswered(503))
    assert upload_may_pass_again(httpx.ConnectError("reset")) and upload_may_pass_again(ConnectionResetError())
    for refused in (_HubAnswered(401), _HubAnswered(403), _HubAnswered(404), _HubAnswered(413), ValueError("bad folder")):
        assert not upload_may_pass_again(refused), refused
