"""The rerank server: real server processes on loopback ports driven by a real HTTP client (routes,
scores against in-process predict, bad input, limits, API key, disconnects, SIGTERM draining). The
scheduler and the app in-process (a failing model, 503 while warming up): test_rerank_scheduler.py.

Every request and every server start has a timeout; every server process is stopped by its
fixture's finalizer. The servers run the tiny twin uncompiled (--no-compile): the same predict path,
without a 10-60 s compile per server start, and on one torch thread (on a CPU shared with other
processes, two threads' spin-waits made each predict call 10-20x slower).
"""

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import data
import helpers

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 90  # imports + load + warm-up of the uncompiled tiny twin take ~5 s; the machine is shared
TIMEOUT = httpx.Timeout(30.0)  # per request; the slowest here scores ~300 short pairs
# fp32, same weights and code as the server: only how pairs are grouped into padded batches differs
# (the server's groups vs one predict call), which changes summation order: logits move by up to
# ~3e-6 (seen), the project's logit tolerance is 1e-5 (tests/helpers.py); the scores clients get
# (sigmoid, slope <= 1/4) move by < 1e-6.
TOL = 1e-6
LOGIT_TOL = helpers.TOL
LONG_DOC = " ".join(data.SENTENCES[:60])  # > 512 tokens: truncated at --max-length


class Server:
    def __init__(self, tmp_path: Path, model_dir: str, *flags: str, program: tuple[str, ...] = ("serve.py",)):
        from serve_bench import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"server-{self.port}.log"
        # fp32 as the in-process reference below (the CPU default may be bf16: device_policy.py)
        argv = [sys.executable, *program, "--model", model_dir, "--device", "cpu", "--no-compile",
                "--dtype", "float32", "--port", str(self.port), "--log-level", "warning", "--threads", "1", *flags]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {STARTUP_S} s (exit {self.proc.returncode}):\n{self.log.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=TIMEOUT, headers=getattr(self, "auth", {})).text
        return scrape(text, name, **labels)


def scrape(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name and ",".join(sorted((m[2] or "").split(","))) == (want or ""):
            return float(m[3])
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    # a small token budget per predict call: requests are split across calls and several share one
    s = Server(tmp_path_factory.mktemp("serve"), tiny_model_dir, "--max-batch-tokens", "512",
               "--max-client-batch-size", "300", "--max-request-bytes", "1500000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_model_dir):
    # requests wait 2 s for company: a second one arrives while the first still holds the queue
    s = Server(tmp_path_factory.mktemp("guarded"), tiny_model_dir, "--api-key", "s3cret", "--max-wait-ms", "2000",
               "--max-queue", "40", "--max-client-batch-size", "40")
    s.auth = {"Authorization": "Bearer s3cret"}
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The in-process predict the server must match: same model, flags and (uncompiled) path."""
    from dynamic_cross_encoder import DynamicCrossEncoder

    model = DynamicCrossEncoder(tiny_model_dir, device="cpu", max_length=512, compile=False,
                                model_kwargs={"dtype": torch.float32})

    def logits(pairs):
        return model.predict([list(p) for p in pairs], batch_size=8, activation_fn=torch.nn.Identity())

    return logits


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def by_index(hits, n, key):
    out = np.full(n, np.nan)
    for h in hits:
        out[h["index"]] = h[key]
    return out


def assert_close(out, ref, tol=TOL):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape
    assert ref.std() > 1e-3, "the reference barely varies: the comparison would prove nothing"
    diff = np.abs(out - ref).max()
    assert diff <= tol, f"max |diff| {diff:.2e} > {tol:.0e}"


QUERY, DOCS = data.load_rerank(1, 12, seed=3, doc_words=(1, 200))[0]
DOCS = DOCS + [LONG_DOC, "", DOCS[0]]  # truncated, empty and duplicated documents too


# ---------------------------------------------------------------- routes


def test_health_info_metrics(server):
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    info = httpx.get(server.url + "/info", timeout=TIMEOUT).json()
    assert info["source"].startswith("random-weight synthetic twin (tiny")
    assert (info["dtype"], info["device"], info["max_length"], info["batch_size"]) == ("float32", "cpu", 512, 8)
    assert info["versions"]["torch"] == torch.__version__ and "eager" in info["attention"]
    assert info["limits"]["max_batch_tokens"] == 512
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    assert scrape(text, "rerank_requests_total", route="/info", status="200") >= 1
    for name in ("rerank_request_seconds_count", "rerank_queue_pairs", "rerank_batch_pairs_count",
                 "rerank_batch_tokens_count", "rerank_pairs_scored_total", "rerank_pairs_per_second"):
        assert re.search(rf"^{name}[ {{]", text, re.M), name


def test_tei_rerank_matches_predict(server, reference):
    logits = reference([(QUERY, d) for d in DOCS])
    hits = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True},
                      timeout=TIMEOUT).json()
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and sorted(h["index"] for h in hits) == list(range(len(DOCS)))
    assert all(h["text"] == DOCS[h["index"]] for h in hits)
    assert_close(by_index(hits, len(DOCS), "score"), sigmoid(logits))  # raw_scores false: the sigmoid
    raw = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True},
                     timeout=TIMEOUT).json()
    assert "text" not in raw[0]
    assert_close(by_index(raw, len(DOCS), "score"), logits, LOGIT_TOL)


@pytest.mark.parametrize("route, docs_by_default", [("/v1/rerank", True), ("/v2/rerank", False)])
def test_cohere_jina_rerank(server, reference, tiny_cross_encoder, route, docs_by_default):
    documents = [d if i % 2 else {"text": d, "title": "ignored"} for i, d in enumerate(DOCS)]
    ref = sigmoid(reference([(QUERY, d) for d in DOCS]))
    body = {"model": "my-reranker", "query": QUERY, "documents": documents}
    out = httpx.post(server.url + route, json=body, timeout=TIMEOUT).json()
    # usage: the tokens the model scored, LONG_DOC's pair cut at --max-length 512 as CrossEncoder cuts it
    scored = int(tiny_cross_encoder.preprocess([[QUERY, d] for d in DOCS])["attention_mask"].sum())
    assert out["model"] == "my-reranker" and out["id"] and out["usage"]["total_tokens"] == scored
    assert out["meta"]["api_version"]["version"] == route[2]
    assert_close(by_index(out["results"], len(DOCS), "relevance_score"), ref)
    assert ("document" in out["results"][0]) is docs_by_default
    top = httpx.post(server.url + route, json={**body, "top_n": 3, "return_documents": True}, timeout=TIMEOUT).json()
    assert [r["index"] for r in top["results"]] == list(np.argsort(-ref, kind="stable")[:3])
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in top["results"])


def test_score_pairs_in_order(server, reference):
    pairs = data.load_pairs(20, seed=5, min_sentences=1, max_sentences=8) + [["", ""], [LONG_DOC, "x"]]
    out = httpx.post(server.url + "/score", json={"pairs": pairs}, timeout=TIMEOUT).json()
    assert_close(out["scores"], sigmoid(reference(pairs)))
    raw = httpx.post(server.url + "/score", json={"pairs": pairs, "raw_scores": True}, timeout=TIMEOUT).json()
    assert_close(raw["scores"], reference(pairs), LOGIT_TOL)


@pytest.mark.parametrize("route, body, want", [
    ("/rerank", {"query": "q", "texts": []}, []),
    ("/score", {"pairs": []}, {"scores": []}),
])
def test_empty_input_answers_empty(server, route, body, want):
    r = httpx.post(server.url + route, json=body, timeout=TIMEOUT)
    assert (r.status_code, r.json()) == (200, want)


def test_empty_documents_api(server):
    out = httpx.post(server.url + "/v2/rerank", json={"query": "q", "documents": []}, timeout=TIMEOUT).json()
    assert out["results"] == []


def test_64_concurrent_requests_get_their_own_scores(server, reference):
    """Mixed sizes (1-40 documents of 1-150 words): requests are split across predict calls and
    share them, and each still gets exactly its own scores in its own order."""
    rng = np.random.default_rng(0)
    items = [data.load_rerank(1, int(rng.integers(1, 41)), seed=100 + i, doc_words=(1, 150))[0] for i in range(64)]
    pairs = [(q, d) for q, docs in items for d in docs]
    scores = sigmoid(reference(pairs))
    bounds = np.cumsum([0] + [len(docs) for _, docs in items])
    before = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text

    async def one(client, i):
        q, docs = items[i]
        if i % 2:
            r = await client.post(server.url + "/score", json={"pairs": [[q, d] for d in docs]})
            return np.asarray(r.json()["scores"])
        r = await client.post(server.url + "/rerank", json={"query": q, "texts": docs})
        return by_index(r.json(), len(docs), "score")

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(asyncio.wait_for(run(), 120))
    assert [len(r) for r in results] == list(np.diff(bounds))
    assert_close(np.concatenate(results), scores)  # request i's scores are rows bounds[i]:bounds[i + 1]
    after = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    calls = scrape(after, "rerank_batch_requests_count") - scrape(before, "rerank_batch_requests_count")
    alone = (scrape(after, "rerank_batch_requests_bucket", le="1.0")
             - scrape(before, "rerank_batch_requests_bucket", le="1.0"))
    assert calls > alone > 0, "no predict call was shared by requests (or none held one request)"
    assert calls > 64, "no request was split across predict calls"


# ---------------------------------------------------------------- bad input and limits


TOO_LONG = {"query": "q", "texts": ["short", LONG_DOC], "truncate": False}


@pytest.mark.parametrize("route, body, status, says", [
    ("/rerank", {"query": "q"}, 422, "texts: Field required"),
    ("/rerank", {"query": "q", "texts": "abc"}, 422, "texts: Input should be a valid list, got 'abc'"),
    ("/rerank", {"query": 5, "texts": ["a"]}, 422, "query: Input should be a valid string, got 5"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": 1}, 422,
     "raw_scores: Input should be a valid boolean, got 1"),
    ("/v2/rerank", {"query": "q", "documents": ["a", 5]}, 422, "documents.1: Input should be a string or an object"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "t"}]}, 422,
     "documents.0: Input should be a string or an object with a string 'text', got {'title': 't'}"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": "3"}, 422,
     "top_n: Input should be a valid integer, got '3'"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n must be >= 1, got 0"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -2}, 400, "top_n must be >= 1, got -2"),
    ("/score", {"pairs": [["a", "b", "c"]]}, 422, "pairs.0: List should have at most 2 items"),
    ("/rerank", {"query": "q", "texts": ["d"] * 301}, 413, "texts has 301 items, more than --max-client-batch-size 300"),
    ("/v2/rerank", {"query": "q", "documents": ["d"] * 301}, 413, "documents has 301 items"),
    ("/rerank", {"query": "q", "texts": ["x" * 1_500_001]}, 413, "larger than --max-request-bytes 1500000"),
    ("/rerank", TOO_LONG, 413, "texts[1] is "),
])
def test_bad_input(server, route, body, status, says):
    r = httpx.post(server.url + route, json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_bad_body_encoding(server):
    r = httpx.post(server.url + "/rerank", content=b'{"query": "q", "texts": [', timeout=TIMEOUT,
                   headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"][:18]) == (422, "body: invalid JSON")
    r = httpx.post(server.url + "/rerank", data={"query": "q"}, timeout=TIMEOUT)  # form-encoded
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["error"]

    def chunks():  # chunked: no content-length to refuse it by
        for _ in range(151):
            yield b"x" * 10_000

    r = httpx.post(server.url + "/rerank", content=chunks(), timeout=TIMEOUT)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]


def test_disconnect_drops_unstarted_documents(server):
    """300 documents of ~500 tokens against a 512-token budget: one predict call each. The client
    leaves after 0.2 s; what no call had taken is dropped, the rest is scored, nothing is lost."""
    dropped, scored = server.metric("rerank_pairs_dropped_total"), server.metric("rerank_pairs_scored_total")
    body = {"query": "q", "texts": [LONG_DOC] * 300}
    assert len(json.dumps(body)) < 1_500_000
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/rerank", json=body, timeout=0.2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metric("rerank_queue_pairs") > 0:
        time.sleep(0.1)
    new_dropped = server.metric("rerank_pairs_dropped_total") - dropped
    new_scored = server.metric("rerank_pairs_scored_total") - scored
    assert new_dropped > 0 and new_dropped + new_scored == 300
    assert httpx.post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}, timeout=TIMEOUT).status_code == 200


# ---------------------------------------------------------------- API key and a full queue


@pytest.mark.parametrize("route", ["/rerank", "/metrics", "/info"])
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer s3cre", "Bearer s3cret2", "s3cret", "bearer s3cret"])
def test_api_key_refused(guarded, route, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.request("POST" if route == "/rerank" else "GET", guarded.url + route, headers=headers, timeout=TIMEOUT,
                      json={"query": "q", "texts": ["a"]} if route == "/rerank" else None)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "API key" in r.json()["error"]


def test_api_key_accepted(guarded):
    assert httpx.get(guarded.url + "/health", timeout=TIMEOUT).status_code == 200  # probes need no key
    assert httpx.get(guarded.url + "/info", headers=guarded.auth, timeout=TIMEOUT).status_code == 200
    r = httpx.post(guarded.url + "/rerank", json={"query": "q", "texts": ["a"]}, headers=guarded.auth, timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()) == 1


def test_official_cohere_client(guarded, reference):
    """Cohere's own SDK, unchanged but for base_url: v2 and v1 rerank parse, the key is sent."""
    cohere = pytest.importorskip("cohere")
    ref = sigmoid(reference([(QUERY, d) for d in DOCS]))
    best = list(np.argsort(-ref, kind="stable")[:3])
    v2 = cohere.ClientV2(api_key="s3cret", base_url=guarded.url, timeout=30)
    out = v2.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3)
    assert [r.index for r in out.results] == best
    assert_close([r.relevance_score for r in out.results], ref[best])
    v1 = cohere.Client(api_key="s3cret", base_url=guarded.url, timeout=30)
    out = v1.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    assert [(r.index, r.document.text) for r in out.results] == [(i, DOCS[i]) for i in best]
    with pytest.raises(cohere.errors.UnauthorizedError):
        cohere.ClientV2(api_key="wrong", base_url=guarded.url, timeout=30).rerank(model="m", query="q", documents=["a"])


def test_full_queue_answers_503_with_retry_after(guarded, reference):
    """30 pairs wait 2 s in a 40-pair queue; 20 more are refused meanwhile, then accepted."""
    first_docs, second_docs = DOCS[:10] * 3, DOCS[:10] * 2
    out = {}

    def first():
        out["r"] = httpx.post(guarded.url + "/rerank", json={"query": QUERY, "texts": first_docs},
                              headers=guarded.auth, timeout=TIMEOUT)

    t = threading.Thread(target=first)
    t.start()
    deadline = time.monotonic() + 1.5
    while guarded.metric("rerank_queue_pairs") < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(guarded.url + "/rerank", json={"query": QUERY, "texts": second_docs}, headers=guarded.auth,
                   timeout=TIMEOUT)
    t.join(30)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert "--max-queue 40" in r.json()["error"]
    assert out["r"].status_code == 200
    assert_close(by_index(out["r"].json(), 30, "score"), sigmoid(reference([(QUERY, d) for d in first_docs])))
    again = httpx.post(guarded.url + "/rerank", json={"query": QUERY, "texts": second_docs}, headers=guarded.auth,
                       timeout=TIMEOUT)
    assert again.status_code == 200


# ---------------------------------------------------------------- lifecycle


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path, tiny_model_dir, reference):
    s = Server(tmp_path, tiny_model_dir, "--max-wait-ms", "3000")
    try:
        items = data.load_rerank(4, 6, seed=7, doc_words=(1, 80))
        results = [None] * 4

        def send(i):
            q, docs = items[i]
            results[i] = httpx.post(s.url + "/rerank", json={"query": q, "texts": docs},
                                    timeout=TIMEOUT)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while s.metric("rerank_queue_pairs") < 24 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.metric("rerank_queue_pairs") == 24, "the requests were not queued before SIGTERM"
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(s.url + "/health", timeout=5)
        for t in threads:
            t.join(30)
        assert s.proc.wait(30) == 0
        for (q, docs), r in zip(items, results):
            assert r is not None and r.status_code == 200
            assert_close(by_index(r.json(), len(docs), "score"), sigmoid(reference([(q, d) for d in docs])))
    finally:
        s.stop()


# serve.run() as `serve.py` runs it, on a model that raises the error named by argv[1] on a document
# holding "boom" (test_rerank_scheduler's FakeModel): the real server, only the model is fake.
FAILING_SERVER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch, serve, test_rerank_scheduler as t
kinds = {{name: make for name, make, _ in t.ERROR_KINDS}}
make = kinds[sys.argv[1]]
def load(service):
    service.activation, service.info = torch.sigmoid, {{"model": "fake"}}
    return t.FakeModel(errors={{"boom": make}})
serve.Service._load = load
cfg, _, _ = serve.parse(sys.argv[2:])
sys.exit(serve.run(cfg, cfg.bench.model))
""".format(root=str(ROOT), tests=str(ROOT / "tests"))


@pytest.mark.parametrize("kind, sticky", [
    pytest.param("AcceleratorError: CUDA error: device-side assert triggered", True,
                 marks=pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch < 2.8")),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", True),
    ("ValueError", False),
])
def test_a_lost_device_fails_its_requests_and_the_server_exits_1(tmp_path, tiny_model_dir, kind, sticky):
    """Two requests share one predict call (they wait 2 s for company); one holds "boom". A lost
    device: both get 503 naming it and the process exits 1 by itself, for its supervisor to restart
    it. A request's own error: a 500 for it alone, the other scored, the server stays up."""
    s = Server(tmp_path, tiny_model_dir, "--max-wait-ms", "2000", program=("-c", FAILING_SERVER, kind))
    try:
        bodies = [{"query": "q", "texts": ["ok", "boom"]}, {"query": "q", "texts": ["fine"]}]

        async def both():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                return await asyncio.gather(*(client.post(s.url + "/rerank", json=b) for b in bodies))

        answers = asyncio.run(asyncio.wait_for(both(), 60))
        if sticky:
            for r in answers:
                assert r.status_code == 503 and r.json()["error"].startswith("the device failed ("), r.text
            assert s.proc.wait(30) == 1, s.log.read_text()
            assert "the model can no longer serve" in s.log.read_text()
        else:
            assert [r.status_code for r in answers] == [500, 200]
            assert httpx.get(s.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
            s.stop()
            assert s.proc.returncode == 0
    finally:
        s.stop()


@pytest.mark.parametrize("flags, says", [
    (["--max-queue", "10", "--max-client-batch-size", "20"], "max_queue must be >= max_client_batch_size (20), got 10"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_bad_flags_exit_2_with_one_line(flags, says):
    r = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--device", "cpu", *flags], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_summary_takes_the_median_round_and_the_spread():
    import serve_bench

    r = serve_bench.summarize("m", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 100, [2.0, 1.0, 4.0])
    assert (r.requests, r.pairs, r.seconds) == (2, 100, 2.0)  # requests per round
    assert (r.pairs_per_s, r.pairs_per_s_min, r.pairs_per_s_max) == (50.0, 25.0, 100.0)
    assert r.rounds_pairs_per_s == [50.0, 100.0, 25.0]
    assert r.p50_ms == pytest.approx(350.0) and r.p99_ms == pytest.approx(595.0)


def test_load_benchmark_end_to_end(tiny_model_dir, tmp_path):
    """`serve.py --benchmark` on the uncompiled tiny twin, a small load: both servers and predict score
    every pair; the ratios are the modes' own pairs/s; the table says what was run."""
    out = tmp_path / "load.json"
    argv = [sys.executable, str(ROOT / "serve.py"), "--benchmark", "--model", tiny_model_dir, "--device", "cpu",
            "--no-compile", "--dtype", "float32", "--threads", "1", "--clients", "3", "--requests", "5",
            "--docs", "4", "--rounds", "2", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    modes = {m["name"]: m for m in report["modes"]}
    coalescing, single = modes["coalescing"], modes["one at a time"]
    ceiling = modes["predict (in-process, one call)"]
    per_request = modes["predict (in-process, a call per request)"]
    assert report["load"] == dict(clients=3, requests=5, docs=4, seed=0, rounds=2)
    for m in (coalescing, single, ceiling, per_request):
        assert (m["requests"], m["pairs"]) == (5, 20)
        assert m["pairs_per_s_min"] <= m["pairs_per_s"] <= m["pairs_per_s_max"] and len(m["rounds_pairs_per_s"]) == 2
        assert m["pairs_per_s"] == pytest.approx(20 / m["seconds"])
    for m in (coalescing, single, per_request):  # every round's scores against predict's in one call
        assert 0 <= m["max_abs_diff"] < LOGIT_TOL
    assert per_request["p50_ms"] < ceiling["p50_ms"]  # the latency of a call of 4 pairs, not of 20
    assert report["predict_one_call_vs_per_request"] == pytest.approx(ceiling["pairs_per_s"] / per_request["pairs_per_s"])
    assert report["coalescing_vs_predict"] == pytest.approx(coalescing["pairs_per_s"] / ceiling["pairs_per_s"])
    assert report["coalescing_vs_one_at_a_time"] == pytest.approx(coalescing["pairs_per_s"] / single["pairs_per_s"])
    assert report["config"]["dtype"] == "float32" and report["config"]["no_compile"] is True
    assert "random-weight synthetic twin" in report["model_source"]
    assert f"coalescing keeps {report['coalescing_vs_predict']:.0%} of in-process predict's pairs/s" in done.stdout
    assert "load: 3 clients, 5 requests x 4 documents" in done.stdout


def test_load_benchmark_rejects_bad_load_flags(tiny_model_dir):
    for flag, value in (("--rounds", "0"), ("--clients", "0"), ("--docs", "-1")):
        done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--benchmark", "--model", tiny_model_dir,
                               flag, value], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 2 and f"{flag[2:]} must be >= 1, got {value}" in done.stderr
        assert "Traceback" not in done.stderr
