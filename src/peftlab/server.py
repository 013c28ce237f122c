"""`peftlab serve`: an HTTP classifier in the request shape of text-embeddings-inference.

POST /predict {"inputs": "text" | ["t1", ...], "adapter": "name", "truncate": bool}
  -> [{"label", "score"}, ...] for each input, every label, highest score first (a list of such lists
     when `inputs` is a list); GET /health, /info, /metrics (Prometheus).
Errors are JSON {"error", "error_type"} with the status that says who must act.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from peftlab.config import ServeSettings
from peftlab.serving import ServedModel


class RequestError(Exception):
    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


class _Metrics:
    def __init__(self, in_flight, queue_depth):
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
        self.metrics = _Metrics(lambda: self.in_flight, lambda: self.batcher.depth())
        self.batcher = MicroBatcher(served.probabilities, settings.max_batch_tokens, settings.max_wait_ms / 1000,
                                    self.metrics.on_batch)
        # A fast tokenizer's truncation setting is state on the tokenizer: one call at a time.
        self.tokenizer_lock = threading.Lock()

    def parse(self, body: bytes) -> tuple[list[str], bool, str, bool]:
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(422, "Validation", f"the body is not JSON: {exc}") from None
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

    def tokenize(self, texts: list[str], adapter: str, truncate: bool) -> list[list[int]]:
        limit = self.served.adapters[adapter].max_length
        with self.tokenizer_lock:
            # One token over the limit is enough to tell an over-long text from one that fits.
            ids = self.served.tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"]
            long = [i for i, x in enumerate(ids) if len(x) > limit]
            if long and not truncate:
                raise RequestError(413, "Validation", f"input {long[0]} is longer than {limit} tokens, the "
                                                      f"model's limit; send \"truncate\": true to cut it")
            if long:
                cut = self.served.tokenizer([texts[i] for i in long], truncation=True, max_length=limit)["input_ids"]
                for i, x in zip(long, cut):
                    ids[i] = x
        return ids

    def answer(self, probabilities: list, adapter: str) -> list[list[dict[str, Any]]]:
        labels = self.served.adapters[adapter].labels
        return [[{"label": labels[i], "score": float(p[i])} for i in p.argsort()[::-1]] for p in probabilities]


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

    app = FastAPI(title="peftlab", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.predictor = predictor

    def error(status: int, error_type: str, message: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        key = settings.api_key
        if key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error(401, "Unauthorized", "missing or wrong bearer key (Authorization: Bearer <key>)")
        return await call_next(request)

    async def read_body(request: Request) -> bytes:
        limit = settings.max_payload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "Validation", f"the body is {declared} bytes, over the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, "Validation", f"the body is over the limit of {limit} bytes")
        return bytes(body)

    @app.post("/predict")
    async def predict(request: Request):
        if predictor.in_flight >= settings.max_concurrent:
            predictor.metrics.requests.labels("", "429").inc()
            return error(429, "Overloaded", f"{settings.max_concurrent} requests are already in flight; retry later")
        predictor.in_flight += 1
        started, adapter = time.perf_counter(), ""
        try:
            texts, single, adapter, truncate = predictor.parse(await read_body(request))
            ids = await run_in_threadpool(predictor.tokenize, texts, adapter, truncate)
            future = predictor.batcher.submit(ids, adapter)
            try:
                probabilities = await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(504, "Timeout", f"no answer within {settings.timeout_s:g} s") from None
            predictor.metrics.inputs.labels(adapter).inc(len(texts))
            answer = predictor.answer(probabilities, adapter)
            response = JSONResponse(answer[0] if single else answer)
        except RequestError as exc:
            response = error(exc.status, exc.error_type, exc.message)
        except Exception as exc:  # the model failed: the client learns it, the server stays up
            response = error(500, "Backend", f"{type(exc).__name__}: {exc}")
        finally:
            predictor.in_flight -= 1
        predictor.metrics.requests.labels(adapter, str(response.status_code)).inc()
        predictor.metrics.latency.labels(adapter).observe(time.perf_counter() - started)
        return response

    @app.get("/health")
    async def health():
        if not predictor.batcher.alive():
            return error(503, "Unhealthy", "the model worker has stopped")
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return {**served.info(), "limits": settings.model_dump(exclude={"api_key", "host", "port"})}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(predictor.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(served: ServedModel, settings: ServeSettings) -> None:
    import uvicorn

    print(f"peftlab serve: {', '.join(served.adapters)} on http://{settings.host}:{settings.port} "
          f"(POST /predict, GET /health /info /metrics)", flush=True)
    uvicorn.run(create_app(served, settings), host=settings.host, port=settings.port, log_level="warning")
