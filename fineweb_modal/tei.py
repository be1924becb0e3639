"""A client for Text Embeddings Inference's HTTP API that keeps the server fed and never loses or repeats a row.

TEI batches inputs from every request in flight up to `max_batch_tokens` of *real* tokens (its flash models
are unpadded), so the client packs requests by real token counts (chunk + prefix, no padding), by item
count (≤ `max_client_batch_size`) and by JSON size (≤ the payload limit), and keeps several requests in
flight while the inputs in flight stay within `max_concurrent_requests` (TEI counts permits per input).

408/429/500/502/503/504, connection resets and timeouts are retried with exponential backoff and full jitter.
413 (TEI's answer both to a payload over its limit and to a failed validation) and 422 (its tokenizer's)
bisect the request down to the chunk that caused it, reported by row. 401/403 are configuration errors,
never retried, as is any other 4xx (a request a retry cannot pass) but TEI's 424 (its model failed on a
batch), which fails the shard as transient, for its task's retries, as do other 5xx. On a failure the
shard's other requests in flight are cancelled.
"""

from __future__ import annotations

import asyncio
import math
import random
import shlex
from dataclasses import dataclass, field

import numpy as np

from fineweb_modal.errors import BadDataError, ConfigError, is_transient

DEFAULT_PAYLOAD_LIMIT = 2_000_000  # TEI's --payload-limit default, in bytes
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}  # a proxy's timeout, overloaded, or a server going down or coming up
# TEI refuses an input of more than max_input_length × 250 characters (before tokenizing, unless told to
# truncate, which would cut the text): a chunk of few tokens can pass that with one huge `[UNK]` word.
TEI_CHARS_PER_TOKEN = 250
_JSON_OVERHEAD_PER_INPUT = 8  # quotes, comma, and room for escapes beyond the measured text


class TEIUnavailable(ConnectionError):
    """TEI kept failing (overloaded, down, resetting) after every retry: a transient failure of the shard."""


class TEIRequestError(BadDataError):
    """TEI rejected a chunk (validation): retrying the same input cannot help."""


class TEIAuthError(ConfigError):
    """TEI refused the API key (or its absence): a configuration error, not retried."""


@dataclass(frozen=True)
class TEIInfo:
    """The limits TEI's `GET /info` reports, and what model it serves."""

    model_id: str
    max_input_length: int
    max_batch_tokens: int
    max_client_batch_size: int
    max_concurrent_requests: int
    model_sha: str | None = None
    model_dtype: str | None = None
    model_pooling: str | None = None
    version: str | None = None

    @classmethod
    def from_json(cls, payload: dict) -> TEIInfo:
        """Parse `/info`, keeping the fields this client uses; a missing limit is a ConfigError naming it."""
        required = ("model_id", "max_input_length", "max_batch_tokens", "max_client_batch_size", "max_concurrent_requests")
        missing = [k for k in required if k not in payload]
        if missing:
            raise ConfigError(f"TEI's /info lacks {', '.join(missing)}: not a TEI server, or an unsupported version")
        fields = {k: payload[k] for k in cls.__dataclass_fields__ if k in payload}
        # TEI >= 1.0 nests the pooling under model_type.embedding; 0.x had model_pooling at the top.
        model_type = payload.get("model_type")
        embedding = model_type.get("embedding") if isinstance(model_type, dict) else None
        if isinstance(embedding, dict) and embedding.get("pooling"):
            fields["model_pooling"] = embedding["pooling"]
        return cls(**fields)


@dataclass
class TEIStats:
    """What a client's `embed` calls cost in requests and retries (per shard in its result, for tests)."""

    requests: int = 0
    retries: int = 0
    splits: int = 0
    max_inputs_in_flight: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0  # timeouts, resets, refused connections

    def retried(self) -> str | None:
        """`7 retries over 52 requests (HTTP 429 ×4, HTTP 503 ×2, timeout or reset ×1)` when any request was retried, else None."""
        if not self.retries:
            return None
        causes = [f"HTTP {status} ×{count}" for status, count in sorted(self.statuses.items()) if status in RETRY_STATUSES]
        causes += [f"timeout or reset ×{self.transport_errors}"] if self.transport_errors else []
        return f"{self.retries} retries over {self.requests} requests ({', '.join(causes)})"


def pack_requests(token_counts: list[int], text_bytes: list[int], token_budget: int, max_items: int, max_payload: int) -> list[list[int]]:
    """Group row indices into requests, longest first, each within the token, item and payload limits."""
    order = sorted(range(len(token_counts)), key=lambda i: -token_counts[i])
    requests: list[list[int]] = []
    current: list[int] = []
    tokens = payload = 0
    for index in order:
        size = text_bytes[index] + _JSON_OVERHEAD_PER_INPUT
        if current and (tokens + token_counts[index] > token_budget or len(current) >= max_items or payload + size > max_payload):
            requests.append(current)
            current, tokens, payload = [], 0, 0
        current.append(index)
        tokens += token_counts[index]
        payload += size
    if current:
        requests.append(current)
    return requests


class _InputPermits:
    """At most `limit` inputs in flight across requests (TEI's concurrency permits are per input)."""

    def __init__(self, limit: int):
        self.limit, self.in_use, self.peak = limit, 0, 0
        self._changed = asyncio.Condition()

    async def acquire(self, count: int) -> None:
        """Wait until `count` more inputs fit (a request larger than the limit goes alone), then take them."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use + count <= self.limit or self.in_use == 0)
            self.in_use += count
            self.peak = max(self.peak, self.in_use)

    async def release(self, count: int) -> None:
        """Give back a finished request's inputs and wake the requests waiting for room."""
        async with self._changed:
            self.in_use -= count
            self._changed.notify_all()


class TEIClient:
    """Async client for one TEI server; the API key is sent as a bearer token and never shown."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 8,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        payload_limit: int = DEFAULT_PAYLOAD_LIMIT,
    ):
        self.url = url.rstrip("/")
        api_key = (api_key or "").strip() or None  # keys pasted from a file or a Secret often end in a newline
        if api_key and not (api_key.isascii() and api_key.isprintable()):
            # httpx would refuse the header and quote it in its error: check here, and never echo the key.
            raise ConfigError("the TEI API key holds characters an HTTP header cannot carry (non-ASCII or control characters)")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.payload_limit = payload_limit
        self.stats = TEIStats()

    def __repr__(self) -> str:
        return f"TEIClient(url={self.url!r}, api_key={'set' if self._api_key else 'none'})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _client(self):
        import httpx

        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        return httpx.AsyncClient(base_url=self.url, headers=self._headers(), timeout=self.timeout_s, limits=limits)

    async def info(self) -> TEIInfo:
        """`GET /info`, retried like any request; anything but TEI's answer is a ConfigError."""
        async with self._client() as client:
            response = await self._send(client, "GET", "/info", None)
        self._check_auth(response)
        if response.status_code != 200:
            raise ConfigError(f"GET {self.url}/info answered HTTP {response.status_code} ({self._redact(response.text[:200])!r}): is this a TEI server?")
        try:
            payload = response.json()
        except ValueError:
            raise ConfigError(f"GET {self.url}/info did not answer JSON: is this a TEI server?") from None
        return TEIInfo.from_json(payload)

    def _redact(self, text: str) -> str:
        """Error text with the API key masked (servers and proxies sometimes echo headers)."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _check_auth(self, response) -> None:
        if response.status_code in (401, 403):
            hint = "the API key was refused" if self._api_key else "it needs an API key: set TEI_API_KEY or the Prefect Secret 'tei-api-key'"
            raise TEIAuthError(f"TEI at {self.url} answered HTTP {response.status_code}: {hint}")

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))

    async def _send(self, client, method: str, path: str, body: bytes | None):
        """One HTTP call with retries for the statuses and transport errors that can pass."""
        import httpx

        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt - 1))
            try:
                response = await client.request(method, path, content=body, headers={"Content-Type": "application/json"} if body else None)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                self.stats.transport_errors += 1
                last_error = self._redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                continue
            self.stats.statuses[response.status_code] = self.stats.statuses.get(response.status_code, 0) + 1
            if response.status_code in RETRY_STATUSES:
                last_error = self._redact(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            return response
        raise TEIUnavailable(f"TEI at {self.url} failed {self.max_retries + 1} times; last: {last_error}")

    async def embed(
        self,
        texts: list[str],
        token_counts: list[int],
        info: TEIInfo,
        dimensions: int | None = None,
        row_names: list[str] | None = None,
    ) -> np.ndarray:
        """Embed texts (prefix already added) whose real token counts are given; rows come back in input order."""
        import orjson

        if not texts:
            return np.zeros((0, dimensions or 0), dtype=np.float32)
        over = [i for i, n in enumerate(token_counts) if n > info.max_input_length]
        if over:
            name = row_names[over[0]] if row_names else f"row {over[0]}"
            raise TEIRequestError(f"chunk {name} has {token_counts[over[0]]} tokens, over TEI's max_input_length {info.max_input_length}")
        char_limit = info.max_input_length * TEI_CHARS_PER_TOKEN
        if long := [i for i, text in enumerate(texts) if len(text) > char_limit]:
            name = row_names[long[0]] if row_names else f"row {long[0]}"
            raise TEIRequestError(
                f"chunk {name} has {len(texts[long[0]]):,} characters ({token_counts[long[0]]} tokens): TEI refuses inputs over "
                f"max_input_length × {TEI_CHARS_PER_TOKEN} = {char_limit:,} characters; embed this shard with --engine transformers"
            )
        encoded = [orjson.dumps(t) for t in texts]
        # Half a server batch per request: two requests fill a batch, more keep the next one queued.
        token_budget = max(max(token_counts), info.max_batch_tokens // 2)
        max_items = max(1, min(info.max_client_batch_size, info.max_concurrent_requests))
        requests = pack_requests(token_counts, [len(e) for e in encoded], token_budget, max_items, int(self.payload_limit * 0.9))
        tokens_per_request = sum(token_counts) / len(requests)
        in_flight = max(2, math.ceil(3 * info.max_batch_tokens / max(tokens_per_request, 1)))
        slots = asyncio.Semaphore(in_flight)
        permits = _InputPermits(info.max_concurrent_requests)
        out: np.ndarray | None = None
        filled = np.zeros(len(texts), dtype=bool)

        def request_body(inputs: list[bytes]) -> bytes:
            body = b'{"inputs":[' + b",".join(inputs) + b'],"truncate":false,"normalize":true'
            return body + (b',"dimensions":%d' % dimensions if dimensions else b"") + b"}"

        async def run(client, indices: list[int]) -> None:
            nonlocal out
            body = request_body([encoded[i] for i in indices])
            async with slots:
                await permits.acquire(len(indices))
                try:
                    self.stats.requests += 1
                    response = await self._send(client, "POST", "/embed", body)
                finally:
                    await permits.release(len(indices))
            self._check_auth(response)
            if response.status_code == 413 and "`dimensions` should be smaller" in response.text:  # TEI >= 1.8, after computing
                raise ConfigError(f"TEI refuses dimensions={dimensions}: {self._redact(response.text[:200])}")
            if response.status_code in (413, 422) and len(indices) > 1:
                self.stats.splits += 1  # too big, or one bad input: halve until the culprit stands alone
                half = len(indices) // 2
                await _together([run(client, indices[:half]), run(client, indices[half:])])
                return
            if response.status_code != 200:
                name = row_names[indices[0]] if row_names else f"row {indices[0]}"
                detail = self._redact(response.text[:300])
                if response.status_code in (413, 422):
                    # One word in the same request: if TEI refuses that too, the request is wrong, not the chunk.
                    probe = await self._send(client, "POST", "/embed", request_body([b'"a"']))
                    if probe.status_code != 200:
                        raise ConfigError(f"TEI rejects every /embed request of this run, not one chunk: HTTP {response.status_code} {detail}")
                    raise TEIRequestError(f"TEI rejected chunk {name} ({token_counts[indices[0]]} tokens): HTTP {response.status_code} {detail}")
                if 400 <= response.status_code < 500 and response.status_code != 424:  # the request is wrong: a retry cannot pass
                    raise ConfigError(f"TEI at {self.url} answered HTTP {response.status_code} to POST /embed: {detail}")
                raise TEIUnavailable(f"TEI answered HTTP {response.status_code} for {len(indices)} chunks: {detail}")
            vectors = np.asarray(orjson.loads(response.content), dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[0] != len(indices):
                raise TEIUnavailable(f"TEI returned {vectors.shape[0] if vectors.ndim else 0} vectors for {len(indices)} inputs")
            if dimensions and vectors.shape[1] != dimensions:
                if vectors.shape[1] < dimensions:
                    raise ConfigError(f"TEI returned {vectors.shape[1]}-dim vectors, fewer than dimensions={dimensions}")
                # A TEI that ignores `dimensions` returns full width: keep the leading dims and renormalize,
                # as the in-process engine does for Matryoshka models.
                vectors = vectors[:, :dimensions]
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            if filled[indices].any():
                raise AssertionError("a row was embedded twice")  # cannot happen: each index is in one request
            out[indices] = vectors
            filled[indices] = True

        async with self._client() as client:
            await _together([run(client, r) for r in requests])
        self.stats.max_inputs_in_flight = max(self.stats.max_inputs_in_flight, permits.peak)
        if out is None or not filled.all():
            raise TEIUnavailable(f"{int((~filled).sum())} rows came back without a vector")
        return out


async def _together(requests: list) -> None:
    """Await the requests together; on the first failure cancel the others and raise it.

    With `gather` the others would run on (against a client being closed, retrying into its errors) until the
    event loop ends. Of failures at the same moment, one that a retry cannot pass is raised: it decides the shard.
    """
    try:
        async with asyncio.TaskGroup() as group:
            for request in requests:
                group.create_task(request)
    except BaseExceptionGroup as failed:
        # (Nothing cancels this from outside: it runs in `asyncio.run` of its own. Python 3.11's TaskGroup leaves
        # `cancelling()` set after a child's failure, so that could not tell an outside cancel apart anyway.)
        # A BaseException that is no Exception first, then one a retry cannot pass: it decides the shard.
        chosen = min(failed.exceptions, key=lambda exc: (isinstance(exc, Exception), is_transient(exc)))
        raise chosen from chosen.__cause__  # its own traceback and cause; the group is left out


def check_served_model(info: TEIInfo, model_id: str, served_as: str | None = None) -> None:
    """The chunks were cut with `model_id`'s tokenizer: the server must serve the same model (reported by its
    name or folder, or under the name `served_as` the user vouches for)."""
    from fineweb_modal.models import model_slug

    if served_as:
        if info.model_id != served_as:
            raise ConfigError(f"TEI serves {info.model_id!r}, not {served_as!r} as --tei-served-model says")
        return
    if model_slug(info.model_id).lower() != model_slug(model_id).lower():
        raise ConfigError(
            f"TEI serves {info.model_id!r} but the run's --model is {model_id!r}: chunks are cut with the model's "
            "tokenizer, so they must match (pass --model with the served model; if this TEI serves --model under "
            f"another name, e.g. on Inference Endpoints, say so with --tei-served-model {shlex.quote(info.model_id)})"
        )


def check_tei_server(url: str, model_id: str, served_as: str | None = None, api_key: str | None = None, timeout_s: float = 10.0) -> TEIInfo:
    """Before any stage runs: the TEI at `url` answers `/info`, takes the key and serves the run's model; else ConfigError.

    Quick (two retries, short timeouts): a server that is down now is a setup to fix, not a wait of minutes
    after download and chunk have run.
    """
    client = TEIClient(url, api_key=api_key, timeout_s=timeout_s, max_retries=2, backoff_base_s=0.5, backoff_cap_s=2.0)
    try:
        info = asyncio.run(client.info())
    except TEIUnavailable as exc:
        raise ConfigError(f"{exc} (is TEI running at --tei-url?)") from None
    check_served_model(info, model_id, served_as)
    return info


def wait_until_healthy(url: str, timeout_s: float = 600.0, process=None) -> None:
    """Poll `GET /health` until TEI answers 200 (model downloaded and warmed up), or fail with what happened."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"text-embeddings-router exited with code {process.returncode} before it was healthy")
        try:
            if httpx.get(f"{url.rstrip('/')}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"TEI at {url} was not healthy after {timeout_s:.0f} s")
