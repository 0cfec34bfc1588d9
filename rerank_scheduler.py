"""The rerank server's one owner of the model: a scheduler thread that coalesces concurrent requests.

Request handlers validate, count tokens, `submit` a Job and await its future; they never touch the
model. The scheduler thread loads and warms the model, then loops:

    wait for a queued job -> wait up to max_wait_s for more, unless the token budget is full
    -> cut a group: pairs of queued jobs in arrival order, up to max_batch_tokens (a large job is
       split across groups, the rest stays at the head of the queue)
    -> one predict call on the group (predict sorts by length and batches; the server hands in pairs
       its request handlers tokenized, pair_tokenizer.EncodedPairs, so this thread never tokenizes)
    -> each job's logits into its own rows; a job's future resolves when all its pairs are scored.

Every model call happens on this one thread: torch.compile's CUDA graphs are recorded and replayed
per thread. A failing predict on a group of several jobs is retried job by job, so only the job
whose pairs fail gets the error. A lost device (`is_device_failure`) is not retried: every job in
flight or queued fails with ServerFailed, the thread ends and the server is told (`on_failure`), as
when the model fails to load.
"""

from __future__ import annotations

import collections
import math
import re
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

IDENTITY = torch.nn.Identity()  # the scheduler keeps logits; each request applies its own activation
ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: what a failed CUDA call raises
# An error of the CUDA stack (runtime, driver, cuBLAS, cuDNN, triton's launcher), as torch and triton word it...
CUDA_STACK = re.compile(r"CUDA (driver )?error|Triton Error \[CUDA\]|CUBLAS_STATUS_|CUDNN_STATUS_|cuDNN error", re.I)
# ...that leaves the CUDA context usable: memory ran short, or a call's arguments were refused before it ran.
RECOVERABLE = re.compile(r"out of memory|_ALLOC_FAILED|invalid (configuration )?argument|too many resources "
                         r"requested for launch|_NOT_SUPPORTED|_INVALID_VALUE|_BAD_PARAM", re.I)


def is_device_failure(error: BaseException) -> bool:
    """Whether `error` (or what caused it) lost the device: an illegal address, a device-side assert,
    a failed launch leave the CUDA context broken, and every later call in the process fails the same
    way. Out of memory is not such an error (torch.OutOfMemoryError, "CUDA out of memory. Tried to
    allocate ...": the model splits the batch and retries, what still fails fails its request), nor
    is a request's own bad input."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError):
            accelerator = ACCELERATOR_ERROR is not None and isinstance(error, ACCELERATOR_ERROR)
            if (accelerator or CUDA_STACK.search(str(error))) and not RECOVERABLE.search(str(error)):
                return True
        error = error.__cause__ or error.__context__
    return False


class QueueFull(Exception):
    """Admitting the job would put more than max_queue pairs in the queue; retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The model is still warming up, or the server is draining."""


class ModelError(Exception):
    """predict raised on this job's pairs; the message names the exception."""


class ServerFailed(Exception):
    """The model can no longer serve (its device is lost, or it failed to load): no job will be scored."""


@dataclass(eq=False)
class Job:
    """One request's pairs (a list, or anything the scheduler's `join` takes: EncodedPairs); tokens: (n,)
    tokens per pair as the model sees them (truncated); future -> (n,) float32 logits in the request's order."""

    pairs: Any
    tokens: np.ndarray
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    next: int = 0  # first pair not yet handed to a group
    scored: int = 0
    cancelled: bool = False
    logits: np.ndarray = field(init=False)

    def __post_init__(self):
        self.logits = np.zeros(len(self.pairs), dtype=np.float32)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (several servers per process in tests)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rerank_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("rerank_request_seconds", "HTTP request latency by route", ["route"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.queue_pairs = Gauge("rerank_queue_pairs", "pairs admitted and not yet scored", registry=r)
        self.batch_pairs = Histogram("rerank_batch_pairs", "pairs per predict call", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_tokens = Histogram("rerank_batch_tokens", "tokens per predict call", registry=r,
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536))
        self.batch_requests = Histogram("rerank_batch_requests", "requests coalesced into one predict call",
                                        registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.pairs = Counter("rerank_pairs_scored", "pairs scored", registry=r)
        self.pairs_dropped = Counter("rerank_pairs_dropped", "pairs dropped unscored (client gone)", registry=r)
        self.pairs_per_s = Gauge("rerank_pairs_per_second", "pairs/s of the last predict call", registry=r)


class Scheduler:
    """Owns the model on one thread; see the module docstring.

    Args:
        load: builds and warms the model (called on the scheduler thread); the model needs
            `predict(pairs, batch_size=, activation_fn=, show_progress_bar=)` -> (n,) scores.
        batch_size: predict's batch_size.
        max_batch_tokens: tokens per group (one predict call); a single pair past it goes alone.
        max_batch_requests: requests per group (None: no limit; 1: one request at a time).
        max_wait_s: how long the oldest queued pair waits for others to fill the group.
        max_queue: pairs admitted and not yet scored; past it `submit` raises QueueFull.
        on_failure: called (on the scheduler thread) with the exception once the model can no longer
            serve: `load` failed, or the device was lost; the server should exit and be restarted.
        join: a group's parts (slices of jobs' pairs) -> predict's input (default: one list).
    """

    def __init__(self, load: Callable[[], Any], *, batch_size: int, max_batch_tokens: int,
                 max_batch_requests: int | None, max_wait_s: float, max_queue: int, metrics: Metrics | None = None,
                 on_failure: Callable[[BaseException], None] | None = None,
                 join: Callable[[list], Any] | None = None):
        self.load, self.batch_size = load, batch_size
        self.join = join or (lambda parts: [p for part in parts for p in part])
        self.max_batch_tokens, self.max_batch_requests = max_batch_tokens, max_batch_requests or math.inf
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        self.metrics = metrics or Metrics()
        self.on_failure = on_failure
        self.model = None
        self.ready = threading.Event()
        self.draining = False
        self.failure: ServerFailed | None = None  # set once the model can no longer serve
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._admitted = 0  # pairs admitted and not yet scored or dropped
        self._waiting_tokens = 0  # tokens of pairs not yet handed to a group
        self._rate = 0.0  # pairs/s of the last group, for Retry-After
        self._thread = threading.Thread(target=self._run, name="rerank-scheduler", daemon=True)
        self.metrics.queue_pairs.set_function(lambda: self._admitted)

    # --- called from request handlers -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, pairs: list, tokens) -> Job:
        """Queue a job; raises ServerFailed, NotAccepting (warming up, draining) or QueueFull."""
        job = Job(pairs, np.asarray(tokens, dtype=np.int64))
        if not pairs:
            job.future.set_result(job.logits)
            return job
        with self._cv:
            if self.failure is not None:
                raise ServerFailed(str(self.failure))
            if self.draining or not self.ready.is_set():
                raise NotAccepting("the server is draining" if self.draining else "the model is warming up")
            if self._admitted + len(pairs) > self.max_queue:
                retry = min(60, max(1, math.ceil(self._admitted / self._rate))) if self._rate else 1
                raise QueueFull(f"the queue holds {self._admitted} pairs; {len(pairs)} more would pass "
                                f"--max-queue {self.max_queue}", retry)
            self._admitted += len(pairs)
            self._waiting_tokens += int(job.tokens.sum())
            self._queue.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> int:
        """The client is gone: drop the job's pairs no group has taken yet; returns how many."""
        with self._cv:
            if job.future.done() or job.cancelled:
                return 0
            job.cancelled = True
            dropped = len(job.pairs) - job.next
            self._admitted -= dropped
            self._waiting_tokens -= int(job.tokens[job.next:].sum())
            job.next = len(job.pairs)
            if job in self._queue:
                self._queue.remove(job)
        self.metrics.pairs_dropped.inc(dropped)
        return dropped

    def stop(self, timeout: float | None = None) -> bool:
        """Finish what is queued, then end the thread; True if it ended within `timeout`."""
        with self._cv:
            self.draining = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def queued_pairs(self) -> int:
        return self._admitted

    # --- the scheduler thread ---------------------------------------------------------------

    def _run(self) -> None:
        group = []
        try:
            self.model = self.load()
            self.ready.set()
            while (group := self._next_group()) is not None:
                self._score(group)
        except BaseException as e:  # noqa: BLE001 - reported to the server, which exits non-zero
            self._give_up(e, group or [])

    def _give_up(self, error: BaseException, group: list[tuple[Job, int, int]]) -> None:
        """No model call will run again: refuse new jobs, tell the server (so /health fails before a
        client hears of it), then fail the group's jobs and the queued ones."""
        if not self.ready.is_set():
            what = "the model failed to load"
        else:
            what = "the device failed" if is_device_failure(error) else "the scheduler failed"
        failure = ServerFailed(f"{what} ({describe(error)}); the server is stopping")
        with self._cv:
            self.failure, self.draining = failure, True
            jobs = list(dict.fromkeys([job for job, _, _ in group] + list(self._queue)))
            self._queue.clear()
            self._admitted = self._waiting_tokens = 0
        if self.on_failure:
            self.on_failure(error)
        for job in jobs:
            job.cancelled = True
            _resolve(job.future.set_exception, ServerFailed(str(failure)))

    def _next_group(self) -> list[tuple[Job, int, int]] | None:
        """Blocks until a group is due: the budget is full, enough requests wait, or the oldest
        waiting pair has waited max_wait_s (at once while draining). None once drained."""
        with self._cv:
            while not self._queue and not self.draining:
                self._cv.wait()
            if not self._queue:
                return None
            while (not self.draining and self._waiting_tokens < self.max_batch_tokens
                   and len(self._queue) < self.max_batch_requests
                   and (left := self._queue[0].enqueued + self.max_wait_s - time.monotonic()) > 0):
                self._cv.wait(left)
            return self._cut()

    def _cut(self) -> list[tuple[Job, int, int]]:
        """(job, lo, hi) slices in arrival order up to the token budget; at least one pair."""
        group, tokens = [], 0
        while self._queue and len(group) < self.max_batch_requests:
            job = self._queue[0]
            cum = np.cumsum(job.tokens[job.next:])
            fit = int(np.searchsorted(cum, self.max_batch_tokens - tokens, side="right"))
            if fit == 0 and group:
                break
            fit = max(fit, 1)
            lo, hi = job.next, job.next + fit
            job.next = hi
            tokens += int(cum[fit - 1])
            group.append((job, lo, hi))
            if hi < len(job.pairs):
                break  # the budget is full; the rest of this job heads the queue
            self._queue.popleft()
        self._waiting_tokens -= tokens
        self.metrics.batch_tokens.observe(tokens)
        return group

    def _score(self, group: list[tuple[Job, int, int]]) -> None:
        pairs = self.join([job.pairs[lo:hi] for job, lo, hi in group])
        start = time.perf_counter()
        try:
            logits = self.model.predict(pairs, batch_size=self.batch_size, activation_fn=IDENTITY,
                                        show_progress_bar=False)
        except Exception as e:  # noqa: BLE001 - a model failure fails its requests, not the server
            if is_device_failure(e):
                raise  # every later call fails too: no retry, _run gives up
            if len(group) > 1:  # find whose pairs fail: one job at a time
                for part in group:
                    self._score([part])
                return
            self._fail(group[0][0], e, group[0][2] - group[0][1])
            return
        seconds = time.perf_counter() - start
        self._rate = len(pairs) / max(seconds, 1e-9)
        m = self.metrics
        m.batch_pairs.observe(len(pairs))
        m.batch_requests.observe(len(group))
        m.pairs.inc(len(pairs))
        m.pairs_per_s.set(self._rate)
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        offset = 0
        for job, lo, hi in group:
            job.logits[lo:hi] = logits[offset : offset + hi - lo]
            offset += hi - lo
            with self._cv:
                self._admitted -= hi - lo
                job.scored += hi - lo
                complete = job.scored == len(job.pairs)
            if complete:
                _resolve(job.future.set_result, job.logits)

    def _fail(self, job: Job, error: Exception, taken: int) -> None:
        """The job's pairs in the failed group and its pairs not yet taken leave the queue."""
        with self._cv:
            rest = len(job.pairs) - job.next
            self._admitted -= taken + rest
            self._waiting_tokens -= int(job.tokens[job.next:].sum())
            job.next = len(job.pairs)
            job.cancelled = True  # its other groups, if any are in flight, find it failed
            if job in self._queue:
                self._queue.remove(job)
        _resolve(job.future.set_exception, ModelError(f"the model failed on this request: {describe(error)}"))


def describe(error: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters of it)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _resolve(setter, value) -> None:
    """Set a future that the client's disconnect may have cancelled meanwhile."""
    try:
        setter(value)
    except InvalidStateError:
        pass
