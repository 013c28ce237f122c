"""What stands behind `/predict`: requests checked and tokenised, texts queued into the
micro-batcher (serving/batcher.py), passes counted for /metrics and /health."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftlab.serving.adapters import ServedModel
from peftlab.serving.settings import ServeSettings
from peftlab.tasks import DECISION_THRESHOLD
from peftlab.windows import combine, window_texts

log = logging.getLogger("peftlab.serve")


# Passes that failed one after another with none succeeding in between: then /health answers 503.
UNHEALTHY_AFTER_FAILED_PASSES = 3
# Characters per token that a text cut before tokenising keeps at first (more if they do not suffice).
CUT_CHARS_PER_TOKEN = 16


class RequestError(Exception):
    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


def timeout_error(settings: ServeSettings) -> RequestError:
    return RequestError(504, "Timeout", f"no answer within {settings.timeout_s:g} s")


@dataclass
class Tokenized:
    ids: list[list[int]]
    documents: np.ndarray | None = None
    """The text each row comes from, where the adapter reads long texts in chunks; else one row a text."""


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
        from peftlab.serving.batcher import MicroBatcher

        self.served, self.settings = served, settings
        self.in_flight = 0
        self.metrics = _Metrics(lambda: self.in_flight, lambda: self.batcher.depth(), lambda: self.batcher.rows())
        self.batcher = MicroBatcher(served.logits, settings.max_batch_tokens, settings.max_wait_ms / 1000,
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
        adapter = self.adapter_of(request.get("adapter"))
        texts, single = self._inputs(request["inputs"], self.served.adapters[adapter].pairs)
        flat = [(i, t) for i, item in enumerate(texts) for t in ((item,) if isinstance(item, str) else item)]
        if not texts or any(not t.strip() for _, t in flat):
            which = "" if not texts else f" (input {next(i for i, t in flat if not t.strip())})"
            raise RequestError(400, "Empty", f"empty input{which}: send at least one non-blank text")
        if len(texts) > self.settings.max_batch_inputs:
            raise RequestError(413, "Validation", f"{len(texts)} inputs is more than this server's batch limit "
                                                  f"of {self.settings.max_batch_inputs}; split the request")
        for i, text in flat:
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
        return texts, single, adapter, truncate

    @staticmethod
    def _inputs(inputs: Any, pairs: bool) -> tuple[list, bool]:
        """The request's texts (a list of them), and whether it sent one. An adapter trained on text
        pairs takes `[a, b]` or `[[a, b], ...]` (text-embeddings-inference's shape for pairs)."""
        if not pairs:
            texts = [inputs] if isinstance(inputs, str) else inputs
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise RequestError(422, "Validation", '"inputs" must be a string or a list of strings')
            return texts, isinstance(inputs, str)

        def is_pair(item: Any) -> bool:
            return isinstance(item, list) and len(item) == 2 and all(isinstance(t, str) for t in item)

        if is_pair(inputs):
            return [tuple(inputs)], True
        if not isinstance(inputs, list) or not all(is_pair(item) for item in inputs):
            raise RequestError(422, "Validation", 'this adapter was trained on text pairs: "inputs" must be a '
                                                  'pair [text, text_pair] or a list of pairs [[text, text_pair], ...]')
        return [tuple(item) for item in inputs], False

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

    def tokenize(self, texts: list[str], adapter: str, truncate: bool, deadline: float) -> Tokenized:
        """Token ids of each text (of each of its windows, where the run read long texts in chunks),
        within `deadline` (time.monotonic()): 504 past it."""
        limit = self.served.adapters[adapter].max_length
        if not self.tokenizer_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise timeout_error(self.settings)
        try:
            windowing = self.served.adapters[adapter].windowing
            if windowing is not None:  # long texts expected: read as the run read them (head and tail, chunks)
                windowed = window_texts(self.served.tokenizer, texts, None, windowing, with_types=False)
                return Tokenized(self._in_time(windowed.input_ids, deadline), windowed.documents)
            # One token over the limit is enough to tell an over-long text from one that fits.
            pairs = bool(texts) and not isinstance(texts[0], str)
            firsts = [self.covering_prefix(t[0] if pairs else t, limit + 1) for t in texts]
            seconds = [self.covering_prefix(t[1], limit + 1) for t in texts] if pairs else None
            texts = (firsts, seconds) if pairs else (firsts,)
            ids = self.served.tokenizer(*texts, truncation=True, max_length=limit + 1)["input_ids"]
            long = [i for i, x in enumerate(ids) if len(x) > limit]
            if long and not truncate:
                raise RequestError(413, "Validation", f"input {long[0]} is longer than {limit} tokens, the "
                                                      f"model's limit; send \"truncate\": true to cut it")
            if long:
                cut = self.served.tokenizer(*([part[i] for i in long] for part in texts), truncation=True,
                                            max_length=limit)["input_ids"]
                for i, x in zip(long, cut):
                    ids[i] = x
        finally:
            self.tokenizer_lock.release()
        return Tokenized(self._in_time(ids, deadline))

    def _in_time(self, ids: list[list[int]], deadline: float) -> list[list[int]]:
        if time.monotonic() > deadline:
            raise timeout_error(self.settings)
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

    def answer(self, logits: list[np.ndarray], adapter: str,
               documents: np.ndarray | None = None) -> list[list[dict[str, Any]]]:
        """Per text, every label with its score, highest first (text-embeddings-inference's shape); a
        multi-label answer marks the labels at or above their thresholds `predicted`, a regression's
        one entry holds the value. A chunked text's window logits are combined first."""
        served = self.served.adapters[adapter]
        values = np.stack(logits)
        if documents is not None:
            values = combine(values, documents, served.windowing.pooling)
        probabilities = self.served.scores(adapter, values)
        labels = served.labels
        if served.task == "regression":
            return [[{"label": labels[0], "score": float(value)}] for value in probabilities]
        answers = [[{"label": labels[i], "score": float(p[i])} for i in p.argsort()[::-1]] for p in probabilities]
        if served.task == "multi_label":
            cut = dict(zip(labels, served.thresholds or [DECISION_THRESHOLD] * len(labels)))
            for answer in answers:
                for entry in answer:
                    entry["predicted"] = entry["score"] >= cut[entry["label"]]
        return answers

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
