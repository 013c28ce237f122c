"""`peftlab serve`: an HTTP classifier in the request shape of text-embeddings-inference.

POST /predict {"inputs": "text" | ["t1", ...], "adapter": "name", "truncate": bool}
  -> [{"label", "score"}, ...] for each input, every label, highest score first (a list of such lists
     when `inputs` is a list); GET /health, /info, /metrics (Prometheus).
Errors are JSON {"error", "error_type"} with the status that says who must act; a client's mistake
is named in a line, and what went wrong inside goes to the log, never to the client.

Every resource a client can hold has a bound and a deadline: a connection's headers and a request's
body arrive within `read_timeout_s` (a slot is taken only once the body is in), open connections are
at most `max_connections`, requests in flight `max_concurrent`, texts waiting for the model
`max_queue_rows`, characters per text `max_text_chars`; `timeout_s` covers tokenisation, the queue
and the forward pass.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from peftlab.batcher import QueueFull
from peftlab.config import ServeSettings
from peftlab.serving import ServedModel

log = logging.getLogger("peftlab.serve")

# Passes that failed one after another with none succeeding in between: then /health answers 503.
UNHEALTHY_AFTER_FAILED_PASSES = 3
# Characters per token that a text cut before tokenising keeps at first (more if they do not suffice).
CUT_CHARS_PER_TOKEN = 16


class RequestError(Exception):
    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


class _Metrics:
    def __init__(self, in_flight, queue_depth, queue_rows):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("peftlab_requests", "HTTP requests to /predict", ["adapter", "status"], registry=r)
        self.inputs = Counter("peftlab_inputs", "texts classified", ["adapter"], registry=r)
        self.latency = Histogram("peftlab_request_duration_seconds", "time to answer /predict", ["adapter"],
                                 registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_rows = Histogram("peftlab_batch_rows", "rows per forward pass", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_tokens = Histogram("peftlab_batch_tokens", "padded tokens per forward pass", registry=r,
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768))
        self.batch_adapters = Histogram("peftlab_batch_adapters", "distinct adapters per forward pass",
                                        registry=r, buckets=(1, 2, 3, 4, 8, 16))
        Gauge("peftlab_requests_in_flight", "requests being answered", registry=r).set_function(in_flight)
        Gauge("peftlab_queue_depth", "requests waiting for the model", registry=r).set_function(queue_depth)
        Gauge("peftlab_queue_rows", "texts waiting for or in a forward pass", registry=r).set_function(queue_rows)

    def on_batch(self, rows: int, tokens: int, adapters: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(tokens)
        self.batch_adapters.observe(adapters)


class Predictor:
    """Validation, tokenisation and the micro-batcher behind /predict."""

    def __init__(self, served: ServedModel, settings: ServeSettings):
        from peftlab.batcher import MicroBatcher

        self.served, self.settings = served, settings
        self.in_flight = 0
        self.metrics = _Metrics(lambda: self.in_flight, lambda: self.batcher.depth(), lambda: self.batcher.rows())
        self.batcher = MicroBatcher(served.probabilities, settings.max_batch_tokens, settings.max_wait_ms / 1000,
                                    self.metrics.on_batch, settings.max_queue_rows)
        # A fast tokenizer's truncation setting is state on the tokenizer: one call at a time.
        self.tokenizer_lock = threading.Lock()

    def parse(self, body: bytes) -> tuple[list[str], bool, str, bool]:
        try:
            request = json.loads(body)
        except json.JSONDecodeError as exc:
            raise RequestError(422, "Validation", f"the body is not JSON: {exc.msg} at character {exc.pos}") from None
        except RecursionError:
            raise RequestError(422, "Validation", "the body's JSON is nested too deeply") from None
        except ValueError:  # not UTF-8, or a number of more digits than Python converts
            raise RequestError(422, "Validation", "the body is not JSON in UTF-8") from None
        if not isinstance(request, dict) or "inputs" not in request:
            raise RequestError(422, "Validation", 'the body must be a JSON object with "inputs"')
        unknown = sorted(set(request) - {"inputs", "adapter", "truncate"})
        if unknown:
            raise RequestError(422, "Validation", f"unknown field(s) {unknown}; expected inputs, adapter, truncate")
        inputs, single = request["inputs"], isinstance(request["inputs"], str)
        texts = [inputs] if single else inputs
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError(422, "Validation", '"inputs" must be a string or a list of strings')
        if not texts or any(not t.strip() for t in texts):
            which = "" if not texts else f" (input {next(i for i, t in enumerate(texts) if not t.strip())})"
            raise RequestError(400, "Empty", f"empty input{which}: send at least one non-blank text")
        if len(texts) > self.settings.max_batch_inputs:
            raise RequestError(413, "Validation", f"{len(texts)} inputs is more than this server's batch limit "
                                                  f"of {self.settings.max_batch_inputs}; split the request")
        for i, text in enumerate(texts):
            if len(text) > self.settings.max_text_chars:
                raise RequestError(413, "Validation", f"input {i} has {len(text)} characters, over this server's "
                                                      f"limit of {self.settings.max_text_chars} characters a text")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(422, "Validation", f"input {i} is not valid Unicode (a lone surrogate "
                                                      "such as \\ud800)") from None
        truncate = request.get("truncate", self.settings.auto_truncate)
        if not isinstance(truncate, bool):
            raise RequestError(422, "Validation", '"truncate" must be true or false')
        return texts, single, self.adapter_of(request.get("adapter")), truncate

    def adapter_of(self, name: Any) -> str:
        adapters = self.served.adapters
        if name is None:
            if len(adapters) == 1:
                return next(iter(adapters))
            raise RequestError(400, "Validation", f'name an "adapter": one of {sorted(adapters)}')
        # A name is only ever a key of the start-up list: it never reaches the file system.
        if not isinstance(name, str) or name not in adapters:
            raise RequestError(404, "NotFound", f"unknown adapter {str(name)[:80]!r}; this server has "
                                                f"{sorted(adapters)}")
        return name

    def tokenize(self, texts: list[str], adapter: str, truncate: bool, deadline: float) -> list[list[int]]:
        """Token ids of each text, within `deadline` (time.monotonic()): 504 past it."""
        limit = self.served.adapters[adapter].max_length
        if not self.tokenizer_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _timeout(self.settings)
        try:
            # One token over the limit is enough to tell an over-long text from one that fits.
            texts = [self.covering_prefix(t, limit + 1) for t in texts]
            ids = self.served.tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"]
            long = [i for i, x in enumerate(ids) if len(x) > limit]
            if long and not truncate:
                raise RequestError(413, "Validation", f"input {long[0]} is longer than {limit} tokens, the "
                                                      f"model's limit; send \"truncate\": true to cut it")
            if long:
                cut = self.served.tokenizer([texts[i] for i in long], truncation=True, max_length=limit)["input_ids"]
                for i, x in zip(long, cut):
                    ids[i] = x
        finally:
            self.tokenizer_lock.release()
        if time.monotonic() > deadline:
            raise _timeout(self.settings)
        return ids

    def covering_prefix(self, text: str, tokens: int) -> str:
        """The text cut where its first `tokens` tokens (specials included) are certainly the whole
        text's, so that a long text is not tokenised whole: the cut keeps a whitespace after the last
        of them, and every tokenizer peftlab serves (WordPiece, byte-level BPE, SentencePiece) splits
        words at whitespace. The text itself when it is short, or when the tokenizer gives no offsets."""
        chars = CUT_CHARS_PER_TOKEN * (tokens + 2)
        if len(text) <= chars or not getattr(self.served.tokenizer, "is_fast", False):
            return text
        while chars < len(text):
            cut = text[:chars]
            encoded = self.served.tokenizer(cut, truncation=True, max_length=tokens, return_offsets_mapping=True)
            end = max((stop for _, stop in encoded["offset_mapping"]), default=0)
            if len(encoded["input_ids"]) >= tokens and any(c.isspace() for c in cut[end:]):
                return cut
            chars *= 4
        return text

    def answer(self, probabilities: list, adapter: str) -> list[list[dict[str, Any]]]:
        labels = self.served.adapters[adapter].labels
        return [[{"label": labels[i], "score": float(p[i])} for i in p.argsort()[::-1]] for p in probabilities]

    def health(self) -> tuple[int, dict[str, Any]]:
        batcher = self.batcher
        last = batcher.last_success
        report = {"last_success": last, "last_success_age_s": None if last is None else round(time.time() - last, 3),
                  "failed_passes_since": batcher.failures_since_success}
        if not batcher.alive():
            return 503, {"error": "the model worker has stopped", "error_type": "Unhealthy", **report}
        if batcher.failures_since_success >= UNHEALTHY_AFTER_FAILED_PASSES:
            return 503, {"error": f"the last {batcher.failures_since_success} forward passes failed",
                         "error_type": "Unhealthy", **report}
        return 200, {"status": "ok", **report}


class BearerKey:
    """Every route but /health needs 'Authorization: Bearer <key>'. Plain ASGI, not @app.middleware("http"),
    which wraps each request in task groups and streams that cost a loaded server more than the request."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = JSONResponse({"error": "missing or wrong bearer key (Authorization: Bearer <key>)",
                                        "error_type": "Unauthorized"}, status_code=401,
                                       headers={"WWW-Authenticate": "Bearer"})
                return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


def _timeout(settings: ServeSettings) -> RequestError:
    return RequestError(504, "Timeout", f"no answer within {settings.timeout_s:g} s")


def _public_name(name: str) -> str:
    """A model's name as /info shows it without a key: a local path by its last component only."""
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or Path(name).exists()
    return Path(name).name if looks_local else name


def create_app(served: ServedModel, settings: ServeSettings):
    from contextlib import asynccontextmanager

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool

    predictor = Predictor(served, settings)

    @asynccontextmanager
    async def lifespan(app):
        predictor.batcher.start()
        yield
        predictor.batcher.stop()

    app = FastAPI(title="peftlab", lifespan=lifespan, redoc_url=None, docs_url="/docs" if settings.docs else None,
                  openapi_url="/openapi.json" if settings.docs else None)
    app.state.predictor = predictor

    def error(status: int, error_type: str, message: str, close: bool = False) -> JSONResponse:
        headers = {}
        if close:  # the rest of the body is not read: the connection cannot carry another request
            headers["Connection"] = "close"
        return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)

    if settings.api_key:
        app.add_middleware(BearerKey, key=settings.api_key)

    async def read_body(request: Request) -> bytes:
        """The body, whole, within `read_timeout_s` (408) and `max_payload_bytes` (413, declared or sent)."""
        limit = settings.max_payload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "Validation", f"the body is {declared} bytes, over the limit of {limit} bytes")

        async def gather() -> bytes:
            body = bytearray()
            try:
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise RequestError(413, "Validation", f"the body is over the limit of {limit} bytes")
            except ClientDisconnect:  # nobody reads the answer; it is counted
                raise RequestError(400, "Disconnected", "the client closed the connection before its body") from None
            return bytes(body)

        try:
            return await asyncio.wait_for(gather(), settings.read_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, "Timeout", f"the body did not arrive within {settings.read_timeout_s:g} s") \
                from None

    def is_json(request: Request) -> bool:
        return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"

    @app.post("/predict")
    async def predict(request: Request):
        started, adapter = time.perf_counter(), ""
        # The body is in before a slot is taken: a slow upload holds a connection, never a slot.
        try:
            if not is_json(request):
                raise RequestError(415, "Validation", "send the body as JSON (Content-Type: application/json)")
            body = await read_body(request)
        except RequestError as exc:
            predictor.metrics.requests.labels("", str(exc.status)).inc()
            return error(exc.status, exc.error_type, exc.message, close=exc.status in (408, 413, 415))
        if predictor.in_flight >= settings.max_concurrent:
            predictor.metrics.requests.labels("", "429").inc()
            return error(429, "Overloaded", f"{settings.max_concurrent} requests are already in flight; retry later")
        predictor.in_flight += 1
        deadline = time.monotonic() + settings.timeout_s  # tokenisation, queue and forward pass
        try:
            texts, single, adapter, truncate = predictor.parse(body)
            tokenizing = run_in_threadpool(predictor.tokenize, texts, adapter, truncate, deadline)
            try:
                ids = await asyncio.wait_for(tokenizing, max(0.0, deadline - time.monotonic()))
                future = predictor.batcher.submit(ids, adapter)
                probabilities = await asyncio.wait_for(asyncio.wrap_future(future),
                                                       max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _timeout(settings) from None
            except QueueFull as exc:
                raise RequestError(429, "Overloaded", str(exc)) from None
            predictor.metrics.inputs.labels(adapter).inc(len(texts))
            answer = predictor.answer(probabilities, adapter)
            response = JSONResponse(answer[0] if single else answer)
        except RequestError as exc:
            response = error(exc.status, exc.error_type, exc.message)
        except Exception:  # the model failed: the client learns that, the log what; the server stays up
            log.exception("POST /predict (adapter %r) failed", adapter)
            response = error(500, "Backend", "the model failed on this request; the server log has the details")
        finally:
            predictor.in_flight -= 1
        predictor.metrics.requests.labels(adapter, str(response.status_code)).inc()
        predictor.metrics.latency.labels(adapter).observe(time.perf_counter() - started)
        return response

    @app.get("/health")
    async def health():
        status, report = predictor.health()
        return JSONResponse(report, status_code=status)

    @app.get("/info")
    async def info():
        described = served.info()
        if not settings.api_key:  # anyone may ask: no local paths
            described["base"] = _public_name(described["base"])
        return {**described, "limits": settings.model_dump(exclude={"api_key", "host", "port"})}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(predictor.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def header_deadline_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline on a request's headers. uvicorn's `timeout_keep_alive`
    closes a connection idle between requests, but its first byte of a request cancels that timer:
    a client that then sends its headers a byte at a time would hold the connection for ever. Here
    a connection that has not sent a whole request head within `timeout_s` of opening, or of its
    last answer, is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            scope = self.scope  # a new request head replaces it

            def expire() -> None:
                idle = self.cycle is None or self.cycle.response_complete
                if self.scope is scope and idle and not self.transport.is_closing():
                    self.transport.close()

            self._head_timer = self.loop.call_later(timeout_s, expire)

    return HeaderDeadlineProtocol


def uvicorn_config(app, settings: ServeSettings, **overrides: Any):
    """The uvicorn configuration of `peftlab serve`: bounded connections, headers and idle time."""
    import uvicorn

    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning",
        http=header_deadline_protocol(settings.read_timeout_s),
        limit_concurrency=settings.max_connections,  # more connections (or tasks) than this: 503
        timeout_keep_alive=5,  # seconds an idle keep-alive connection stays open
        h11_max_incomplete_event_size=16 * 1024,  # a request head (line and headers) of at most 16 KiB
        **overrides)


def exposure_warning(settings: ServeSettings) -> str | None:
    """A line to print when anyone on the network may use the server: not loopback, and no key."""
    if settings.api_key:
        return None
    try:
        loopback = ipaddress.ip_address(settings.host.strip("[]")).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if loopback:
        return None
    return (f"peftlab serve: warning: listening on {settings.host} with no PEFTLAB_API_KEY: whoever reaches "
            "this port can use the model; set PEFTLAB_API_KEY, or listen on 127.0.0.1")


def serve(served: ServedModel, settings: ServeSettings) -> None:
    import uvicorn

    warning = exposure_warning(settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"peftlab serve: {', '.join(served.adapters)} on http://{settings.host}:{settings.port} "
          f"(POST /predict, GET /health /info /metrics{' /docs' if settings.docs else ''})", flush=True)
    uvicorn.Server(uvicorn_config(create_app(served, settings), settings)).run()
