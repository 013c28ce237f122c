"""Micro-batching: requests that arrive close together share forward passes, bounded by a token budget.

One worker thread owns the model. It takes the first waiting request, waits up to `max_wait_s` for
more while the padded batch stays within `max_batch_tokens`, then runs the rows sorted by length in
forward passes that each stay within the budget, and hands every request its own rows back.

The rows waiting or running are bounded (`max_queue_rows`): a request whose client gave up still
holds its rows while its pass runs, so the number of requests in flight alone does not bound the
work. When a batch fails, its requests are run again one by one, so that only the one that fails
the model fails. The time of the last successful pass and the failures since are kept for /health.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """More rows than `max_queue_rows` would wait for the model."""


@dataclass
class Job:
    ids: list[list[int]]
    adapter: str
    future: Future = field(default_factory=Future)

    @property
    def longest(self) -> int:
        return max(len(x) for x in self.ids)


# (token ids of each row, adapter of each row) -> what the model says of each row (its logits, in serving)
Forward = Callable[[list[list[int]], list[str]], list[np.ndarray]]
# (rows, padded tokens, distinct adapters) of each forward pass, for metrics
OnBatch = Callable[[int, int, int], None]


class MicroBatcher:
    def __init__(self, forward: Forward, max_batch_tokens: int, max_wait_s: float,
                 on_batch: OnBatch | None = None, max_queue_rows: int | None = None):
        self.forward, self.max_batch_tokens, self.max_wait_s = forward, max_batch_tokens, max_wait_s
        self.on_batch = on_batch or (lambda rows, tokens, adapters: None)
        self.max_queue_rows = max_queue_rows
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.carried: Job | None = None
        self._rows, self._rows_lock = 0, threading.Lock()
        self.last_success: float | None = None  # time.time() at the end of the last successful pass
        self.failures_since_success = 0  # failed passes since then
        self.thread = threading.Thread(target=self._work, name="peftlab-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, ids: list[list[int]], adapter: str) -> Future:
        """Queue the rows; `QueueFull` if they would take the rows waiting or running past `max_queue_rows`
        (a request is always taken when nothing waits). The rows count until the request's future is done:
        answered, failed, or cancelled before its pass started."""
        job = Job(ids, adapter)
        with self._rows_lock:
            if self.max_queue_rows is not None and self._rows and self._rows + len(ids) > self.max_queue_rows:
                raise QueueFull(f"{self._rows} texts are already waiting for the model (limit "
                                f"{self.max_queue_rows}); retry later")
            self._rows += len(ids)
        job.future.add_done_callback(lambda _, n=len(ids): self._release(n))
        self.jobs.put(job)
        return job.future

    def _release(self, rows: int) -> None:
        with self._rows_lock:
            self._rows -= rows

    def depth(self) -> int:
        return self.jobs.qsize()

    def rows(self) -> int:
        """Rows waiting for or in a forward pass."""
        return self._rows

    def _work(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            # A request that timed out while waiting is dropped here; one already running finishes.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self._run(batch)
            except Exception as exc:  # the server keeps serving
                if len(batch) == 1:
                    batch[0].future.set_exception(exc)
                    continue
                # Once more one by one: only the request that breaks the model fails.
                for job in batch:
                    try:
                        job.future.set_result(self._run([job])[0])
                    except Exception as alone:
                        job.future.set_exception(alone)
                continue
            for job, result in zip(batch, results):
                job.future.set_result(result)

    def _collect(self) -> list[Job] | None:
        first = self.carried or self.jobs.get()
        self.carried = None
        if first is None:
            return None
        batch, rows, longest = [first], len(first.ids), first.longest
        deadline = time.monotonic() + self.max_wait_s
        while rows * longest < self.max_batch_tokens:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            if (rows + len(job.ids)) * max(longest, job.longest) > self.max_batch_tokens:
                self.carried = job  # opens the next batch
                break
            batch.append(job)
            rows, longest = rows + len(job.ids), max(longest, job.longest)
        return batch

    def _run(self, batch: list[Job]) -> list[list[np.ndarray]]:
        rows = [(j, r) for j, job in enumerate(batch) for r in range(len(job.ids))]
        # Longest first: each forward pass pads to its own longest row, so neighbours in length share one.
        rows.sort(key=lambda jr: -len(batch[jr[0]].ids[jr[1]]))
        results: list[list[np.ndarray]] = [[np.empty(0)] * len(job.ids) for job in batch]
        start = 0
        while start < len(rows):
            longest = len(batch[rows[start][0]].ids[rows[start][1]])
            size = max(1, self.max_batch_tokens // max(longest, 1))
            chunk = rows[start : start + size]
            ids = [batch[j].ids[r] for j, r in chunk]
            adapters = [batch[j].adapter for j, _ in chunk]
            try:
                answers = self.forward(ids, adapters)
            except Exception:
                self.failures_since_success += 1
                raise
            self.last_success, self.failures_since_success = time.time(), 0
            for (j, r), probs in zip(chunk, answers):
                results[j][r] = probs
            self.on_batch(len(chunk), len(chunk) * longest, len(set(adapters)))
            start += size
        return results
