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
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from peftlab.serving.adapters import ServedModel
from peftlab.serving.batcher import QueueFull
from peftlab.serving.predictor import Predictor, RequestError, timeout_error
from peftlab.serving.settings import ServeSettings

log = logging.getLogger("peftlab.serve")

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
                tokenized = await asyncio.wait_for(tokenizing, max(0.0, deadline - time.monotonic()))
                future = predictor.batcher.submit(tokenized.ids, adapter)
                logits = await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise timeout_error(settings) from None
            except QueueFull as exc:
                raise RequestError(429, "Overloaded", str(exc)) from None
            predictor.metrics.inputs.labels(adapter).inc(len(texts))
            answer = predictor.answer(logits, adapter, tokenized.documents)
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
