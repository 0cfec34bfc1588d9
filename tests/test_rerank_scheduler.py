"""The rerank server's scheduler and app in-process, with a fake model: coalescing, splitting, a model
that fails on one request, cancelled documents, a full queue, 503 while warming up and the 500 a
failing request gets. The real server process is tested in test_serve.py."""

import asyncio
import threading
import time
import types

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

import rerank_scheduler as rs
import serve
from test_serve import TIMEOUT, by_index, scrape
from test_serve import TOL as SCORE_TOL


class FakeEncoded(list):
    """What FakeModel.encode_pairs gives: the pairs, a token a character; slices and joins as EncodedPairs does."""

    @property
    def untruncated(self):
        return np.array([len(a) + len(b) for a, b in self], dtype=np.int64)

    @property
    def ids(self):
        return types.SimpleNamespace(lengths=self.untruncated)

    def __getitem__(self, rows):
        return FakeEncoded(list.__getitem__(self, rows))

    @classmethod
    def concat(cls, parts):
        return cls(p for part in parts for p in part)


def oom():
    return torch.OutOfMemoryError("CUDA out of memory (emulated)")


class FakeModel:
    """predict -> one logit per pair (its texts' lengths); raises errors[word]() on a pair whose
    document holds `word` (by default an out-of-memory error on "boom"), the first word listed first."""

    def __init__(self, gate: threading.Event | None = None, errors: dict | None = None):
        self.calls, self.gate, self.errors = [], gate, errors or {"boom": oom}

    def encode_pairs(self, pairs):
        return FakeEncoded(pairs)

    def predict(self, pairs, batch_size, activation_fn, show_progress_bar):
        self.calls.append(list(pairs))
        if self.gate is not None:
            self.gate.wait(10)
        for word, error in self.errors.items():
            if any(word in b for _, b in pairs):
                raise error()
        return np.array([len(a) + len(b) / 7 for a, b in pairs], dtype=np.float32)


# ---- errors a model call can raise, as torch, cuBLAS, cuDNN and triton word them ------------------

ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: what C10_CUDA_CHECK raises
ASYNC = ("\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
         "below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1")
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered" + ASYNC
DEVICE_ASSERT = "CUDA error: device-side assert triggered" + ASYNC
# The context is lost: every later CUDA call in the process fails the same way.
STICKY = [
    ILLEGAL_ADDRESS, DEVICE_ASSERT, "CUDA error: unspecified launch failure", "CUDA error: misaligned address",
    "CUDA error: an illegal instruction was encountered", "CUDA error: uncorrectable ECC error encountered",
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(handle, opa, opb, m, n, k, ...)`",
    "CUDA error: CUBLAS_STATUS_INTERNAL_ERROR when calling `cublasLtMatmul(ltHandle, computeDesc, ...)`",
    "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED", "CUDA driver error: an illegal memory access was encountered",
    "Triton Error [CUDA]: an illegal memory access was encountered",
]
# The CUDA stack speaking, but the context still works: memory ran short or a call's arguments were refused.
NOT_STICKY = [
    "CUDA error: out of memory", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "Triton Error [CUDA]: out of memory", "CUDA error: invalid argument", "CUDA error: invalid configuration argument",
    "CUDA error: too many resources requested for launch",
    "CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul(ltHandle, computeDesc, ...)`",
    "CUDA error: CUBLAS_STATUS_INVALID_VALUE when calling `cublasGemmEx(handle, opa, opb, m, n, k, ...)`",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
    "cuDNN error: CUDNN_STATUS_BAD_PARAM",
    "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!",
]
needs_accelerator_error = pytest.mark.skipif(ACCELERATOR_ERROR is None, reason="torch < 2.8 has no AcceleratorError")


def chained(cause: BaseException) -> BaseException:
    """`cause` wrapped as torch.compile wraps an error raised while it compiles (BackendCompilerFailed)."""
    try:
        raise cause
    except BaseException as e:
        try:
            raise RuntimeError("backend='inductor' raised: see the cause above") from e
        except RuntimeError as wrapped:
            return wrapped


def first(message: str) -> str:
    return message.splitlines()[0][:60]


ERROR_KINDS = [  # (name, () -> the error, sticky)
    *[(f"AcceleratorError: {first(m)}", lambda m=m: ACCELERATOR_ERROR(m), True)
      for m in (ILLEGAL_ADDRESS, DEVICE_ASSERT)],
    ("AcceleratorError without a message", lambda: ACCELERATOR_ERROR(""), True),  # STRIP_ERROR_MESSAGES builds
    ("AcceleratorError: out of memory", lambda: ACCELERATOR_ERROR("CUDA error: out of memory"), False),
    *[(f"RuntimeError: {first(m)}", lambda m=m: RuntimeError(m), True) for m in STICKY],
    *[(f"RuntimeError: {first(m)}", lambda m=m: RuntimeError(m), False) for m in NOT_STICKY],
    ("OutOfMemoryError", lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                                        "a total capacity of 139.81 GiB of which 1.02 GiB is free."),
     False),
    ("chained AcceleratorError", lambda: chained(ACCELERATOR_ERROR(ILLEGAL_ADDRESS)), True),
    ("chained RuntimeError", lambda: chained(RuntimeError(DEVICE_ASSERT)), True),
    ("chained OutOfMemoryError", lambda: chained(oom()), False),
    ("ValueError naming a CUDA error", lambda: ValueError("pairs[3]: 'CUDA error: x' is text, not a pair"), False),
    ("ValueError", lambda: ValueError("batch_size must be >= 1, got 0"), False),
    ("KeyError", lambda: KeyError("cu_seq_lens_q"), False),
    ("TypeError", lambda: TypeError("varlen_attn() got an unexpected keyword argument 'window_size'"), False),
]


def error_params(kinds=ERROR_KINDS):
    return [pytest.param(make, sticky, id=name,
                         marks=[needs_accelerator_error] if "AcceleratorError" in name else [])
            for name, make, sticky in kinds]


@pytest.mark.parametrize("make, sticky", error_params())
def test_which_errors_mean_the_device_is_lost(make, sticky):
    assert rs.is_device_failure(make()) is sticky


def test_device_failures_are_recognized_without_accelerator_error(monkeypatch):
    """A torch without AcceleratorError: CUDA errors are RuntimeErrors, known by their message."""
    monkeypatch.setattr(rs, "ACCELERATOR_ERROR", None)
    assert rs.is_device_failure(RuntimeError(ILLEGAL_ADDRESS)) and rs.is_device_failure(RuntimeError(DEVICE_ASSERT))
    assert not rs.is_device_failure(RuntimeError("CUDA error: out of memory"))
    assert not rs.is_device_failure(ValueError("bad")) and not rs.is_device_failure(oom())


def make_scheduler(model, **kw):
    args = dict(batch_size=4, max_batch_tokens=1000, max_batch_requests=None, max_wait_s=0.3, max_queue=100) | kw
    s = rs.Scheduler(lambda: model, **args)
    s.start()
    assert s.ready.wait(5)
    return s


def expected(pairs):
    return np.array([len(a) + len(b) / 7 for a, b in pairs], dtype=np.float32)


def test_model_failure_fails_only_its_request():
    model = FakeModel()
    sched = make_scheduler(model)
    try:
        good = [("q", f"doc {i}") for i in range(5)]
        bad = [("q", "fine"), ("q", "boom")]
        jobs = [sched.submit(good, [10] * 5), sched.submit(bad, [10] * 2)]
        np.testing.assert_array_equal(jobs[0].future.result(5), expected(good))
        with pytest.raises(rs.ModelError, match="OutOfMemoryError: CUDA out of memory"):
            jobs[1].future.result(5)
        assert model.calls[0] == good + bad, "the two requests were not coalesced"
        later = sched.submit(good, [10] * 5)
        np.testing.assert_array_equal(later.future.result(5), expected(good))
        assert sched.queued_pairs == 0
    finally:
        assert sched.stop(5)


def device_lost():
    return RuntimeError(ILLEGAL_ADDRESS)


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_device_failure_fails_the_jobs_in_flight_and_queued_and_stops():
    """A lost device: the group's jobs and the queued ones fail at once, predict is not called again
    (not job by job, not for the queue), new jobs are refused and the server is told, once."""
    gate = threading.Event()
    model = FakeModel(gate, {"boom": device_lost})
    failures = []
    sched = make_scheduler(model, on_failure=failures.append)
    try:
        in_flight = [sched.submit([("q", "fine"), ("q", "boom")], [10, 10]), sched.submit([("q", "other")], [10])]
        wait_for(lambda: model.calls)
        queued = sched.submit([("q", "later")], [10])
        gate.set()
        for job in in_flight + [queued]:
            with pytest.raises(rs.ServerFailed, match=r"^the device failed \(RuntimeError: CUDA error: an illegal"):
                job.future.result(5)
        assert model.calls == [[("q", "fine"), ("q", "boom"), ("q", "other")]]
        assert [type(e) for e in failures] == [RuntimeError] and str(failures[0]) == ILLEGAL_ADDRESS
        with pytest.raises(rs.ServerFailed, match="the device failed"):
            sched.submit([("q", "new")], [1])
        assert sched.queued_pairs == 0
        assert sched.stop(5)
    finally:
        gate.set()
        sched.stop(5)


def test_device_failure_while_retrying_job_by_job_stops_the_retry():
    """A group fails on one request's bad input and is retried job by job; the device is lost on the
    third job: the fourth is never tried on the dead device, and fails with the device."""
    model = FakeModel(errors={"bad": lambda: ValueError("a bad pair"), "boom": device_lost})
    failures = []
    sched = make_scheduler(model, on_failure=failures.append)
    try:
        parts = [[("q", "good")], [("q", "bad")], [("q", "boom")], [("q", "after")]]
        jobs = [sched.submit(p, [10]) for p in parts]
        np.testing.assert_array_equal(jobs[0].future.result(5), expected(parts[0]))
        with pytest.raises(rs.ModelError, match="ValueError: a bad pair"):
            jobs[1].future.result(5)
        for job in jobs[2:]:
            with pytest.raises(rs.ServerFailed, match="the device failed"):
                job.future.result(5)
        assert model.calls == [sum(parts, []), *parts[:3]]
        assert len(failures) == 1 and sched.stop(5)
    finally:
        sched.stop(5)


def test_load_failure_takes_the_same_path():
    failures = []

    def load():
        raise FileNotFoundError("model.safetensors")

    sched = rs.Scheduler(load, batch_size=4, max_batch_tokens=100, max_batch_requests=None, max_wait_s=0,
                         max_queue=10, on_failure=failures.append)
    sched.start()
    assert sched.stop(5) and not sched.ready.is_set()
    assert [type(e) for e in failures] == [FileNotFoundError]
    with pytest.raises(rs.ServerFailed, match=r"^the model failed to load \(FileNotFoundError: model.safetensors\)"):
        sched.submit([("q", "d")], [1])


def test_coalesced_requests_get_their_own_rows():
    model = FakeModel()
    sched = make_scheduler(model)
    try:
        parts = [[("q1", "a"), ("q1", "bbb"), ("q1", "cc")], [("q2", "dddd")], [("q3", "e"), ("q3", "")]]
        jobs = [sched.submit(p, [5] * len(p)) for p in parts]
        for job, p in zip(jobs, parts):
            np.testing.assert_array_equal(job.future.result(5), expected(p))
        assert model.calls == [parts[0] + parts[1] + parts[2]], "not one coalesced predict call"
    finally:
        assert sched.stop(5)


def test_large_request_split_in_order_and_cancel_drops_the_rest():
    gate = threading.Event()
    model = FakeModel(gate)
    sched = make_scheduler(model, max_batch_tokens=30, max_wait_s=0)
    try:
        first = sched.submit([("a", "x")], [10])  # taken at once; its predict blocks on the gate
        deadline = time.monotonic() + 5
        while not model.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        pairs = [("q", "d" * i) for i in range(10)]
        big = sched.submit(pairs, [10] * 10)  # 3 pairs per predict call
        other = sched.submit(pairs[:4], [10] * 4)
        assert sched.cancel(other) == 4 and sched.queued_pairs == 11
        gate.set()
        first.future.result(5)
        np.testing.assert_array_equal(big.future.result(5), expected(pairs))
        assert [len(c) for c in model.calls] == [1, 3, 3, 3, 1]
        assert sum(c == pairs[:4] for c in model.calls) == 0 and sched.queued_pairs == 0
    finally:
        gate.set()
        assert sched.stop(5)


def test_full_queue_and_warming_up_refuse():
    gate = threading.Event()
    sched = rs.Scheduler(lambda: gate.wait(5) and FakeModel(), batch_size=4, max_batch_tokens=100,
                         max_batch_requests=None, max_wait_s=5, max_queue=10)
    sched.start()
    try:
        with pytest.raises(rs.NotAccepting, match="warming up"):
            sched.submit([("q", "d")], [1])
        gate.set()
        assert sched.ready.wait(5)
        sched.submit([("q", "d")] * 8, [1] * 8)
        with pytest.raises(rs.QueueFull, match="holds 8 pairs; 3 more would pass --max-queue 10") as e:
            sched.submit([("q", "d")] * 3, [1] * 3)
        assert e.value.retry_after >= 1
        last = sched.submit([("q", "d")] * 2, [1] * 2)  # exactly full is fine
        assert sched.stop(2), "stop() waited out max_wait_s instead of draining at once"
        assert last.future.result(0).shape == (2,) and sched.queued_pairs == 0
    finally:
        gate.set()
        sched.stop(10)


def test_app_503_until_warm_and_500_for_a_failing_request(tiny_model_dir):
    """The app in-process (ASGI) on a scheduler whose model loads when the test says so and fails on
    "boom": 503 while warming up, then a 500 for the failing request only."""
    cfg, _, _ = serve.parse(["--model", tiny_model_dir, "--device", "cpu", "--no-compile"])
    service = serve.Service(cfg, tiny_model_dir)
    gate = threading.Event()

    def load():
        gate.wait(10)
        service.activation, service.info = torch.sigmoid, {"model": "fake"}
        return FakeModel()

    service.scheduler.load = load
    app = serve.create_app(service)
    service.scheduler.start()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app",
                                     timeout=TIMEOUT) as c:
            health = await c.get("/health")
            assert (health.status_code, health.json()) == (503, {"status": "warming up"})
            early = await c.post("/rerank", json={"query": "q", "texts": ["a"]})
            assert early.status_code == 503 and early.headers["Retry-After"] == "1"
            gate.set()
            assert await asyncio.to_thread(service.scheduler.ready.wait, 10)
            good, bad = await asyncio.gather(
                c.post("/rerank", json={"query": "q", "texts": ["a", "bb"], "raw_scores": True}),
                c.post("/v2/rerank", json={"query": "q", "documents": ["ok", "boom"]}))
            assert good.status_code == 200
            assert by_index(good.json(), 2, "score").tolist() == list(expected([("q", "a"), ("q", "bb")]))
            assert bad.status_code == 500 and "OutOfMemoryError" in bad.json()["error"]
            assert (await c.get("/health")).status_code == 200
            return (await c.get("/metrics")).text

    try:
        text = asyncio.run(asyncio.wait_for(go(), 60))
        assert scrape(text, "rerank_requests_total", route="/v2/rerank", status="500") == 1
        assert scrape(text, "rerank_requests_total", route="/health", status="503") == 1
    finally:
        gate.set()
        assert service.scheduler.stop(10)


APP_KINDS = [k for k in ERROR_KINDS if k[0] in ("OutOfMemoryError", "ValueError", "KeyError") or k[0].startswith(
    ("AcceleratorError: CUDA error: an illegal", "RuntimeError: CUDA error: device-side",
     "RuntimeError: CUDA error: CUBLAS_STATUS_EXEC", "RuntimeError: cuDNN error: CUDNN_STATUS_EXEC"))]


def fake_app(model_dir: str, model: FakeModel, *flags: str):
    """-> (Service, app) on `model`, the scheduler started; the model loads at once."""
    cfg, _, _ = serve.parse(["--model", model_dir, "--device", "cpu", "--no-compile", *flags])
    service = serve.Service(cfg, model_dir)

    def load():
        service.activation, service.info = torch.sigmoid, {"model": "fake"}
        return model

    service.scheduler.load = load
    app = serve.create_app(service)
    service.scheduler.start()
    return service, app


async def until(condition, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("make, sticky", error_params(APP_KINDS))
def test_app_answers_503_and_fails_health_once_the_device_is_lost(tiny_model_dir, make, sticky):
    """The app in-process on a model that raises `make()` on "boom": one request in flight holds it,
    another shares its predict call, a third waits in the queue. A lost device: all three get 503
    naming the device, /health says failed, later requests get 503 and the server is told to stop.
    Any other error: a 500 for the failing request only, the others scored, the server stays ok."""
    gate = threading.Event()
    model = FakeModel(gate, {"boom": make})
    service, app = fake_app(tiny_model_dir, model, "--max-wait-ms", "300")
    stopping = threading.Event()
    service.on_fatal = stopping.set

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app",
                                     timeout=TIMEOUT) as c:
            await asyncio.to_thread(service.scheduler.ready.wait, 10)
            failing = asyncio.ensure_future(c.post("/rerank", json={"query": "q", "texts": ["ok", "boom"]}))
            sharing = asyncio.ensure_future(c.post("/score", json={"pairs": [["q", "fine"]]}))
            await until(lambda: model.calls)
            queued = asyncio.ensure_future(c.post("/v2/rerank", json={"query": "q", "documents": ["later"]}))
            await until(lambda: service.scheduler.queued_pairs == 4)
            gate.set()
            answers = await asyncio.gather(failing, sharing, queued)
            return answers, await c.get("/health"), await c.post("/rerank", json={"query": "q", "texts": ["a"]})

    try:
        answers, health, later = asyncio.run(asyncio.wait_for(go(), 60))
        if sticky:
            for r in answers + [later]:
                assert (r.status_code, r.json()["error_type"]) == (503, "failed"), r.text
                assert r.json()["error"].startswith("the device failed (")
            assert (health.status_code, health.json()) == (503, {"status": "failed"})
            assert stopping.is_set() and len(model.calls) == 1 and service.failed is not None
        else:
            assert [r.status_code for r in answers] == [500, 200, 200]
            assert answers[0].json()["error_type"] == "model"
            assert (health.status_code, health.json(), later.status_code) == (200, {"status": "ok"}, 200)
            assert not stopping.is_set() and service.failed is None
    finally:
        gate.set()
        assert service.scheduler.stop(10)


class _RecordingBackend:
    """The model's private tokenizers backend, recording each encode: (thread, texts)."""

    def __init__(self, backend, log):
        self._backend, self._log = backend, log

    def encode_batch_fast(self, texts, **kwargs):
        self._log.append((threading.get_ident(), list(texts)))
        return self._backend.encode_batch_fast(texts, **kwargs)


@pytest.mark.parametrize("family", ["xlm-roberta", "bert", "qwen3-reranker"])
def test_requests_are_tokenized_once_off_the_model_thread(family, tiny_model_dir, family_twin_dir):
    """Each request is tokenized once by its handler (a worker thread of the event loop), its query
    once where the fast tokenizer runs; the thread that runs the model only packs and runs the ids.
    Scores equal predict's: BERT's token types and the generative reranker's prompt template (the
    tokenizer's fallback, CrossEncoder's own call) survive the slicing and joining of coalesced calls."""
    path = tiny_model_dir if family == "xlm-roberta" else family_twin_dir(family)
    cfg, _, _ = serve.parse(["--model", path, "--device", "cpu", "--no-compile", "--dtype", "float32",
                             "--max-wait-ms", "50"])
    service = serve.Service(cfg, path)
    app = serve.create_app(service)
    service.scheduler.start()
    assert service.scheduler.ready.wait(60)
    model = service.scheduler.model
    host = model._pair_tokenizer()
    assert (host.fallback_reason is not None) == (family == "qwen3-reranker")
    calls, texts = [], []  # (thread, pairs) per encode; (thread, texts) per backend encode
    encode = host.encode_pairs
    host.encode_pairs = lambda pairs: calls.append((threading.get_ident(), list(pairs))) or encode(pairs)
    host.backend = _RecordingBackend(host.backend, texts)
    docs = ["lorem ipsum", "dolor sit amet", "", "consectetur " * 40, "lorem ipsum"]
    requests = [(f"query {i}", docs[i % 3:]) for i in range(6)]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app",
                                     timeout=TIMEOUT) as c:
            answers = await asyncio.gather(*(c.post("/rerank", json={"query": q, "texts": d}) for q, d in requests))
        return [by_index(r.json(), len(d), "score") for r, (_, d) in zip(answers, requests)]

    try:
        got = asyncio.run(asyncio.wait_for(go(), 60))
        assert model._owner_ident not in {thread for thread, _ in calls + texts}, "the model's thread tokenized"
        assert sorted(pairs for _, pairs in calls) == sorted([(q, x) for x in d] for q, d in requests)
        if host.fallback_reason is None:  # one parallel encode a request: the query once, each document once
            assert sorted(t for _, t in texts) == sorted([q] + list(dict.fromkeys(d)) for q, d in requests)
        metrics = generate_latest(service.metrics.registry).decode()
        # every request scored, in fewer predict calls than requests: coalesced
        assert scrape(metrics, "rerank_batch_requests_sum") == len(requests)
        assert 1 <= scrape(metrics, "rerank_batch_requests_count") < len(requests)
        for (q, d), scores in zip(requests, got):
            want = model.predict([(q, x) for x in d])  # the model's activation, as the route applies it
            # fp32; only the batch companions differ (summation order): test_serve's score tolerance
            np.testing.assert_allclose(scores, want, rtol=0, atol=SCORE_TOL)
    finally:
        assert service.scheduler.stop(10)
