"""A test double of Text Embeddings Inference's HTTP API — not TEI.

It speaks TEI's `/info`, `/health` and `/embed` on 127.0.0.1 with TEI's limits and status codes, as TEI's
router maps them: 413 over the payload limit and for a failed validation (over the batch size or the input
length), 422 for an input the tokenizer rejects, 401 on `/info` and `/embed` without the API key (`/health`
stays open). Where TEI makes a batch request wait for concurrency permits, the double answers 429 when
more inputs would be in flight than allowed: stricter, so a client that overshoots is seen. It computes
real embeddings with the in-process engine, records what it saw (peak inputs and tokens in flight, largest
request), and injects faults on demand: 429, 503 and 424 (its model failed) answers as TEI gives them; 404,
408, 500, 502 and 504 as a proxy in front of it does; connections reset mid-response, answers slower than the
client's timeout, and going down and coming back. `refusal_status=403` plays a proxy that refuses a request
without the key. `honors_dimensions=False` plays a TEI that ignores `dimensions`. TEI itself needs Docker and a GPU or its Rust binary, neither of which this machine has.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fineweb_modal.embedding import TransformersEngine
from fineweb_modal.models import DEFAULT_MODEL


# TEI's own answers (overloaded, unhealthy), then the plain-text ones of a proxy in front of a TEI that restarts.
FAULT_ANSWERS = {
    "429": lambda: JSONResponse({"error": "Model is overloaded", "error_type": "Overloaded"}, status_code=429),
    "503": lambda: JSONResponse({"error": "unhealthy", "error_type": "Unhealthy"}, status_code=503),
    "424": lambda: JSONResponse({"error": "backend error: CUDA out of memory", "error_type": "Backend"}, status_code=424),
    "500": lambda: PlainTextResponse("Internal Server Error", status_code=500),
    "502": lambda: PlainTextResponse("502 Bad Gateway", status_code=502),
    "504": lambda: PlainTextResponse("504 Gateway Time-out", status_code=504),
    "408": lambda: PlainTextResponse("408 Request Time-out", status_code=408),
    "404": lambda: PlainTextResponse("404 Not Found", status_code=404),  # a proxy whose route to TEI was removed
}


@dataclass
class DoubleMetrics:
    """What the double saw, for assertions about the client's behaviour."""

    requests: int = 0
    embedded_inputs: int = 0
    inputs_in_flight: int = 0
    tokens_in_flight: int = 0
    max_inputs_in_flight: int = 0
    max_tokens_in_flight: int = 0
    max_request_inputs: int = 0
    max_request_tokens: int = 0
    max_payload_bytes: int = 0
    statuses: Counter = field(default_factory=Counter)
    auth_headers: list[str] = field(default_factory=list)


class TEITestDouble:
    """Serve TEI's API on 127.0.0.1 with real embeddings from the in-process engine."""

    def __init__(
        self,
        model_id: str = DEFAULT_MODEL,
        served_model_id: str | None = None,
        max_batch_tokens: int = 2048,
        max_client_batch_size: int = 32,
        max_input_length: int = 256,
        max_concurrent_requests: int = 128,
        payload_limit: int = 2_000_000,
        api_key: str | None = None,
        compute_delay_s: float = 0.0,
        honors_dimensions: bool = True,
        refusal_status: int = 401,
    ):
        self.engine = TransformersEngine(model_id)
        self.served_model_id = served_model_id or model_id
        self.limits = {
            "max_batch_tokens": max_batch_tokens,
            "max_client_batch_size": max_client_batch_size,
            "max_input_length": max_input_length,
            "max_concurrent_requests": max_concurrent_requests,
        }
        self.payload_limit = payload_limit
        self.api_key = api_key
        self.refusal_status = refusal_status
        self.compute_delay_s = compute_delay_s
        self.honors_dimensions = honors_dimensions
        self.faults: list[str] = []  # consumed one per /embed request: an HTTP status of FAULT_ANSWERS, "reset", "slow"
        self.poison: str | None = None  # any request with an input containing this text gets a 422 (the tokenizer's error)
        self.reject_every_embed: str | None = None  # every /embed gets a 413 with this message (a request TEI refuses whole)
        self.slow_s = 2.0
        self.metrics = DoubleMetrics()
        self._compute = threading.Lock()
        self._computing = 0  # worker threads inside _vectors (they outlive a stopped server's event loop)
        self._computing_lock = threading.Lock()
        self._stopping = False
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.app = Starlette(routes=[Route("/info", self._info), Route("/health", self._health), Route("/embed", self._embed, methods=["POST"])])

    @property
    def url(self) -> str:
        """The base URL clients use."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> TEITestDouble:
        """Serve in a background thread (on `port`, or a free one) and wait until it accepts connections."""
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._stopping = False
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the TEI test double did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop serving (connections in flight are dropped), then wait for computations already started."""
        if self._server is not None:
            self._stopping = True
            self._server.should_exit = True
            self._server.force_exit = True
            self._thread.join(timeout=10)
            self._server = None
            # A computation of a dropped request goes on in its worker thread: wait for it, so no thread is inside
            # torch when the process exits (C++ thread pools then abort it: "terminate called without an active exception").
            deadline = time.monotonic() + 30
            while self._computing and time.monotonic() < deadline:
                time.sleep(0.02)

    def restart_after(self, seconds: float) -> threading.Thread:
        """Go down now and come back on the same port after `seconds` (a server dying mid-shard)."""
        port = self.port
        self.stop()

        def come_back():
            time.sleep(seconds)
            self.start(port)

        thread = threading.Thread(target=come_back, daemon=True)
        thread.start()
        return thread

    def _status(self, response: Response) -> Response:
        self.metrics.statuses[response.status_code] += 1
        return response

    async def _health(self, request: Request) -> Response:
        return PlainTextResponse("")

    def _refused(self, request: Request) -> Response | None:
        """TEI's answer to a request without the right bearer token, or None when it may pass."""
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        self.metrics.auth_headers.append(header)
        if header == f"Bearer {self.api_key}":
            return None
        return self._status(Response(status_code=self.refusal_status))  # an empty body, as TEI's auth layer (or the proxy) answers

    async def _info(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        return JSONResponse(
            {
                "model_id": self.served_model_id,
                "model_sha": "test-double",
                "model_dtype": "float32",
                "model_type": {"embedding": {"pooling": self.engine.info.pooling}},
                "max_batch_requests": None,
                "auto_truncate": False,
                "tokenization_workers": 1,
                "version": "test-double",
                **self.limits,
            }
        )

    async def _embed(self, request: Request) -> Response:
        self.metrics.requests += 1
        if refused := self._refused(request):
            return refused
        body = await request.body()
        self.metrics.max_payload_bytes = max(self.metrics.max_payload_bytes, len(body))
        if len(body) > self.payload_limit:
            return self._status(PlainTextResponse("Failed to buffer the request body: length limit exceeded", status_code=413))
        payload = orjson.loads(body)
        inputs = payload["inputs"] if isinstance(payload["inputs"], list) else [payload["inputs"]]
        if self.reject_every_embed:
            return self._status(JSONResponse({"error": self.reject_every_embed, "error_type": "Validation"}, status_code=413))
        fault = self.faults.pop(0) if self.faults else None
        if fault in FAULT_ANSWERS:
            return self._status(FAULT_ANSWERS[fault]())
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        if self.poison and any(self.poison in text for text in inputs):
            return self._status(JSONResponse({"error": "Tokenizer error: poisoned input", "error_type": "Tokenizer"}, status_code=422))
        if len(inputs) > self.limits["max_client_batch_size"]:
            error = f"batch size {len(inputs)} > maximum allowed batch size {self.limits['max_client_batch_size']}"
            return self._status(JSONResponse({"error": error, "error_type": "Validation"}, status_code=413))
        chars, char_limit = max(len(text) for text in inputs), self.limits["max_input_length"] * 250
        if chars > char_limit and not payload.get("truncate", False):
            error = f"Input validation error: `inputs` must have less than {char_limit} characters. Given: {chars}"
            return self._status(JSONResponse({"error": error, "error_type": "Validation"}, status_code=413))
        lengths = [len(e.ids) for e in self.engine.tokenizer.encode_batch(inputs, add_special_tokens=True)]
        if max(lengths) > self.limits["max_input_length"] and not payload.get("truncate", False):
            error = f"Input validation error: `inputs` must have less than {self.limits['max_input_length']} tokens. Given: {max(lengths)}"
            return self._status(JSONResponse({"error": error, "error_type": "Validation"}, status_code=413))
        if self.metrics.inputs_in_flight + len(inputs) > self.limits["max_concurrent_requests"]:
            return self._status(JSONResponse({"error": "Model is overloaded", "error_type": "Overloaded"}, status_code=429))
        m = self.metrics
        m.inputs_in_flight += len(inputs)
        m.tokens_in_flight += sum(lengths)
        m.max_inputs_in_flight = max(m.max_inputs_in_flight, m.inputs_in_flight)
        m.max_tokens_in_flight = max(m.max_tokens_in_flight, m.tokens_in_flight)
        m.max_request_inputs = max(m.max_request_inputs, len(inputs))
        m.max_request_tokens = max(m.max_request_tokens, sum(lengths))
        try:
            dimensions = payload.get("dimensions") if self.honors_dimensions else None
            vectors = await run_in_threadpool(self._vectors, inputs, dimensions, payload.get("normalize", True))
        except _Stopping:  # as TEI answers while it shuts down (if the answer still gets out)
            return self._status(JSONResponse({"error": "shutting down", "error_type": "Unhealthy"}, status_code=503))
        except _DimensionsTooLarge:  # as TEI >= 1.8: checked after the model ran
            error = "`dimensions` should be smaller than the maximum embedding dimension."
            return self._status(JSONResponse({"error": error, "error_type": "Validation"}, status_code=413))
        finally:
            m.inputs_in_flight -= len(inputs)
            m.tokens_in_flight -= sum(lengths)
        m.embedded_inputs += len(inputs)
        content = orjson.dumps(vectors.tolist())
        if fault == "reset":
            return self._status(_CutOffResponse(content, media_type="application/json"))
        return self._status(Response(content, media_type="application/json"))

    def _vectors(self, inputs: list[str], dimensions: int | None, normalize: bool) -> np.ndarray:
        with self._computing_lock:
            self._computing += 1
        try:
            if self.compute_delay_s:
                time.sleep(self.compute_delay_s)  # lets requests overlap, as on a busy GPU
            if self._stopping:
                raise _Stopping()
            with self._compute:
                vectors = self.engine.embed(inputs)
        finally:
            with self._computing_lock:
                self._computing -= 1
        if dimensions and dimensions > vectors.shape[1]:
            raise _DimensionsTooLarge()
        if dimensions:
            vectors = vectors[:, :dimensions]
        if normalize:
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors


class _DimensionsTooLarge(Exception):
    pass


class _Stopping(Exception):
    pass


class _CutOffResponse(Response):
    """Send the headers and half the body, then drop the connection (a reset mid-response)."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})
        raise ConnectionResetError("test double: connection reset mid-response")


def main(argv: list[str] | None = None) -> None:
    """Serve the test double in the foreground, to try `--engine tei` by hand (it is not TEI: see the module's docstring)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m tests.tei_double", description="A test double of TEI's HTTP API on 127.0.0.1 (not TEI)")
    parser.add_argument("--port", type=int, default=8089, help="0 for any free port")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model it embeds with and reports in /info")
    parser.add_argument("--api-key-env", metavar="VAR", help="require the key held in this environment variable (e.g. TEI_API_KEY)")
    args = parser.parse_args(argv)
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    double = TEITestDouble(model_id=args.model, api_key=api_key).start(args.port)
    print(f"TEI test double (not TEI) serving {args.model} on {double.url}; Ctrl-C stops it", flush=True)
    try:
        while double._thread.is_alive():
            double._thread.join(timeout=1)
    except KeyboardInterrupt:
        pass
    finally:
        double.stop()


if __name__ == "__main__":
    main()
