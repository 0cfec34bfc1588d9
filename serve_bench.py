"""`python serve.py --benchmark`: the rerank server under a bounded concurrent load.

Four ways to score the same rerank workload (data.load_rerank: requests of one query and
--docs documents), timed in turn on one machine:

    coalescing      the server as configured: documents of concurrent requests share predict calls
    one at a time   the server with --max-wait-ms 0 --max-batch-requests 1: one predict per request
    predict         in-process DynamicCrossEncoder.predict on all the pairs at once: the ceiling
    predict per request  in-process, one call per request: the model alone with one request at a
                    time; the two predict rows bound what coalescing can gain on this device

Each server runs as its own process on a free loopback port; --clients async clients send the
--requests requests (TEI /rerank, raw_scores) as fast as answers come back, after an untimed warm
load, --rounds times. Reported: pairs/s over each timed load's wall time (the median round, and the
slowest and fastest), p50/p90/p99 request latency over every round, and the max |logit difference|
between the server's scores and predict's for the same pairs (predict: --rounds calls, the median).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

import bench_utils as bu
import data

STARTUP_TIMEOUT_S = 600  # a compiled model warms up in ~1 min on a 2-core CPU, longer under load
REQUEST_TIMEOUT_S = 300


def add_flags(p) -> None:
    add = p.add_argument
    add("--clients", type=int, default=32, help="--benchmark: concurrent clients (default: 32)")
    add("--requests", type=int, default=128, help="--benchmark: timed requests per mode (default: 128)")
    add("--docs", type=int, default=16, help="--benchmark: documents per request (default: 16)")
    add("--seed", type=int, default=0, help="--benchmark: seed of the rerank workload (default: 0)")
    add("--rounds", type=int, default=3, help="--benchmark: timed loads per mode, median reported (default: 3)")
    add("--json", default=None, help="--benchmark: write the results as JSON to this path")


@dataclass
class ModeResult:
    name: str
    requests: int
    pairs: int
    seconds: float  # wall time of the median round
    pairs_per_s: float  # the median round's
    pairs_per_s_min: float
    pairs_per_s_max: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_abs_diff: float | None = None  # |logit - predict's logit|, max over every pair
    rounds_pairs_per_s: list[float] | None = None  # each round's, in order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_argv(cfg, path: str, port: int, *, one_at_a_time: bool) -> list[str]:
    b = cfg.bench
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"),
            "--model", path, "--device", b.device, "--dtype", b.dtype, "--max-length", str(b.max_length),
            "--batch-size", str(b.batch_size), "--max-tokens-per-batch", str(b.max_tokens_per_batch),
            "--compile-mode", b.compile_mode, "--port", str(port), "--log-level", "warning",
            "--max-batch-tokens", str(cfg.max_batch_tokens), "--max-client-batch-size", str(cfg.max_client_batch_size),
            "--max-queue", str(cfg.max_queue), "--max-request-bytes", str(cfg.max_request_bytes),
            "--max-wait-ms", "0" if one_at_a_time else str(cfg.max_wait_ms),
            "--max-batch-requests", "1" if one_at_a_time else str(cfg.max_batch_requests),
            "--threads", str(cfg.threads)]
    return argv + (["--packed" if b.packed else "--no-packed"]) + (["--no-compile"] if cfg.no_compile else [])


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            with_code = None
            try:
                with_code = (await client.get(url + "/health")).status_code
            except httpx.TransportError:
                pass
            if with_code == 200:
                return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {timeout} s")


async def drive(url: str, items, clients: int) -> tuple[list[float], list[np.ndarray], float]:
    """Send every (query, docs) item with `clients` concurrent clients -> (latencies s, logits per
    item in document order, wall seconds)."""
    import httpx

    latencies, scores, queue = [0.0] * len(items), [None] * len(items), iter(range(len(items)))

    async def client_loop(client):
        for i in queue:  # one shared iterator: each item is sent once
            query, docs = items[i]
            t = time.perf_counter()
            r = await client.post(url + "/rerank", json={"query": query, "texts": docs, "raw_scores": True})
            latencies[i] = time.perf_counter() - t
            r.raise_for_status()
            s = np.zeros(len(docs), dtype=np.float64)
            for hit in r.json():
                s[hit["index"]] = hit["score"]
            scores[i] = s

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return latencies, scores, wall


def summarize(name: str, latencies, pairs: int, walls: list[float]) -> ModeResult:
    """latencies of every round's requests; pairs per round; walls: each round's seconds."""
    p = bu.percentiles(latencies)
    seconds = float(np.median(walls))
    return ModeResult(name, len(latencies) // len(walls), pairs, seconds, pairs / seconds, pairs / max(walls),
                      pairs / min(walls), p["p50"] * 1e3, p["p90"] * 1e3, p["p99"] * 1e3,
                      rounds_pairs_per_s=[pairs / w for w in walls])


def server_mode(cfg, path, name, items, warm, clients, rounds, *, one_at_a_time) -> tuple[ModeResult, list]:
    """-> the result, and each round's scores (per item, in document order)."""
    port = free_port()
    proc = subprocess.Popen(server_argv(cfg, path, port, one_at_a_time=one_at_a_time))
    url = f"http://127.0.0.1:{port}"
    latencies, scores, walls = [], [], []
    try:
        asyncio.run(wait_ready(url, proc, STARTUP_TIMEOUT_S))
        asyncio.run(drive(url, warm, clients))  # untimed: connections, caches, shapes
        for _ in range(rounds):
            lat, got, wall = asyncio.run(drive(url, items, clients))
            latencies += lat
            scores.append(got)
            walls.append(wall)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    pairs = sum(len(d) for _, d in items)
    result = summarize(name, latencies, pairs, walls)
    print(f"   {name}: {result.pairs_per_s:.1f} pairs/s ({result.pairs_per_s_min:.1f}-{result.pairs_per_s_max:.1f} "
          f"over {rounds} rounds), p50 {result.p50_ms:.0f} ms", flush=True)
    return result, scores


def predict_mode(cfg, path, items, runs: int = 3) -> tuple[ModeResult, ModeResult, np.ndarray]:
    """In-process predict, `runs` times each after a warm-up: all the pairs in one call (the ceiling),
    then one call per request (what the model alone does with one request at a time: the most a
    server without coalescing could reach) -> both results, and the one call's logits."""
    import torch

    from dynamic_cross_encoder import DynamicCrossEncoder

    b = cfg.bench
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = DynamicCrossEncoder(path, device=b.device, max_length=b.max_length, compile=not cfg.no_compile,
                                model_kwargs={"dtype": b.torch_dtype}, compile_mode=b.compile_mode, packed=b.packed,
                                max_tokens_per_batch=b.max_tokens_per_batch)
    model.warmup(batch_size=b.batch_size)

    def call(pairs):
        return model.predict(pairs, batch_size=b.batch_size, activation_fn=torch.nn.Identity(), show_progress_bar=False)

    def timed(calls) -> tuple[list[float], float, list]:
        """-> (each call's seconds, the wall seconds, each call's logits)"""
        bu.sync(b.device)
        latencies, out, start = [], [], time.perf_counter()
        for pairs in calls:
            t = time.perf_counter()
            out.append(call(pairs))
            bu.sync(b.device)
            latencies.append(time.perf_counter() - t)
        return latencies, time.perf_counter() - start, out

    every = [[(q, d) for q, docs in items for d in docs]]
    per_request = [[(q, d) for d in docs] for q, docs in items]
    results = []
    for name, calls in (("predict (in-process, one call)", every), ("predict (in-process, a call per request)", per_request)):
        _, _, out = timed(calls)  # warm: this call size's shapes
        latencies, walls = [], []
        for _ in range(runs):
            lat, wall, _ = timed(calls)
            latencies += lat
            walls.append(wall)
        result = summarize(name, latencies, len(every[0]), walls)
        result.requests = len(items)
        results.append((result, np.concatenate(out).astype(np.float64)))
    (ceiling, logits), (single, single_logits) = results
    single.max_abs_diff = float(np.abs(single_logits - logits).max())
    return ceiling, single, logits


def main(cfg, args, p) -> int:
    import serve

    for name in ("clients", "requests", "docs", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.docs > cfg.max_client_batch_size or args.clients * args.docs > cfg.max_queue:
        p.error(f"--docs {args.docs} x --clients {args.clients} does not fit --max-client-batch-size / --max-queue")
    path = serve.model_path(cfg, p)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    items = data.load_rerank(args.requests, args.docs, seed=args.seed)
    warm = data.load_rerank(min(args.clients, args.requests), args.docs, seed=args.seed + 10_000_000)
    print("model: " + ", ".join(f"{k}={getattr(cfg.bench, k)!r}" for k in serve.MODEL_FLAGS)
          + f", no_compile={cfg.no_compile}, threads={cfg.threads or 'torch default'}")
    print(f"load: {args.clients} clients, {args.requests} requests x {args.docs} documents", flush=True)
    if not bu.is_cuda(cfg.bench.device) and cfg.bench.model != "synthetic-tiny":
        print("note: a full-size reranker scores a few pairs/s per CPU core; --model synthetic-tiny measures "
              "the server on a CPU in minutes", flush=True)
    modes = []
    rounds = args.rounds
    coalesced, server_scores = server_mode(cfg, path, "coalescing", items, warm, args.clients, rounds,
                                           one_at_a_time=False)
    single, single_scores = server_mode(cfg, path, "one at a time", items, warm, args.clients, rounds,
                                        one_at_a_time=True)
    ceiling, per_request, ref = predict_mode(cfg, path, items, rounds)
    for result, per_round in ((coalesced, server_scores), (single, single_scores)):
        result.max_abs_diff = max(float(np.abs(np.concatenate(scores) - ref).max()) for scores in per_round)
        modes.append(result)
    modes += [ceiling, per_request]
    report = dict(config=dict(asdict(cfg.bench), no_compile=cfg.no_compile, max_wait_ms=cfg.max_wait_ms,
                              max_batch_tokens=cfg.max_batch_tokens),
                  load=dict(clients=args.clients, requests=args.requests, docs=args.docs, seed=args.seed,
                            rounds=rounds),
                  environment=asdict(bu.environment(cfg.bench.device, cfg.bench.torch_dtype)),
                  model_source=serve.models.model_source(path), modes=[asdict(m) for m in modes],
                  coalescing_vs_predict=coalesced.pairs_per_s / ceiling.pairs_per_s,
                  coalescing_vs_one_at_a_time=coalesced.pairs_per_s / single.pairs_per_s,
                  predict_one_call_vs_per_request=ceiling.pairs_per_s / per_request.pairs_per_s)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def format_table(report: dict) -> str:
    rows = ["| mode | pairs/s (median round) | slowest-fastest round | p50 ms | p90 ms | p99 ms | "
            "max abs logit diff vs predict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in report["modes"]:
        diff = "-" if m["max_abs_diff"] is None else f"{m['max_abs_diff']:.1e}"
        rows.append(f"| {m['name']} | {m['pairs_per_s']:.1f} | {m['pairs_per_s_min']:.1f}-{m['pairs_per_s_max']:.1f} | "
                    f"{m['p50_ms']:.0f} | {m['p90_ms']:.0f} | {m['p99_ms']:.0f} | {diff} |")
    rows.append(f"\ncoalescing keeps {report['coalescing_vs_predict']:.0%} of in-process predict's pairs/s and runs "
                f"{report['coalescing_vs_one_at_a_time']:.2f}x one request at a time; in-process, one call of every "
                f"pair runs {report['predict_one_call_vs_per_request']:.2f}x a call per request: the most coalescing "
                f"can gain from the model ({report['model_source']}, {report['environment']['cpu']}, "
                f"{report['config']['device']})")
    return "\n".join(rows)
