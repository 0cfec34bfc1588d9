"""A rerank server on DynamicCrossEncoder: the APIs rerank clients already speak, the fast path behind them.

    python serve.py --model synthetic-tiny --port 8080          # then: curl localhost:8080/health

Routes: POST /rerank (text-embeddings-inference's shape), POST /v1/rerank and /v2/rerank (Jina and
Cohere's shape), POST /score (pairs in, scores out), GET /health, /info, /metrics (Prometheus).
Handlers validate (pydantic), tokenize (the model's own tokenizer, off the event loop, each distinct
text once) and hand a job to the one scheduler thread that owns the model (rerank_scheduler.py), which
coalesces the documents of concurrent requests into token-budget predict calls on those ids.
`python serve.py --benchmark` measures it under load (serve_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import importlib.metadata
import logging
import os
import platform
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

import benchmark
import models
from rerank_scheduler import Metrics, ModelError, NotAccepting, QueueFull, Scheduler, ServerFailed

# The benchmark's model flags, with its help, choices and device defaults.
MODEL_FLAGS = ("model", "device", "dtype", "packed", "max_length", "batch_size", "max_tokens_per_batch", "compile_mode")
ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank", "/score", "/health", "/info", "/metrics")
OPEN_ROUTES = ("/health",)  # load balancers probe it without credentials
CLIENT_GONE = 499  # nginx's "client closed request": only ever seen in the metrics
log = logging.getLogger("serve")


@dataclass
class ServeConfig:
    """The server's knobs; model knobs (device defaults resolved) in `bench`."""

    bench: benchmark.BenchConfig
    host: str = "127.0.0.1"
    port: int = 8080
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 16384
    max_batch_requests: int = 0
    max_client_batch_size: int = 1000
    max_request_bytes: int = 2_000_000
    max_queue: int = 16384
    api_key: str | None = None
    no_compile: bool = False
    threads: int = 0
    log_level: str = "info"

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.max_batch_requests < 0:
            raise ValueError(f"max_batch_requests must be >= 0 (0: no limit), got {self.max_batch_requests}")
        for name in ("max_batch_tokens", "max_client_batch_size", "max_request_bytes", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < self.max_client_batch_size:  # else a request of allowed size could never be admitted
            raise ValueError(f"max_queue must be >= max_client_batch_size ({self.max_client_batch_size}), "
                             f"got {self.max_queue}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty")


def parser() -> argparse.ArgumentParser:
    p = benchmark.parser(__doc__.splitlines()[0], exclude=[f.name for f in dataclasses.fields(benchmark.BenchConfig)
                                                           if f.name not in MODEL_FLAGS])
    add = p.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    add("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    add("--max-wait-ms", type=float, default=5.0,
        help="how long a queued document waits for others to fill a batch (default: 5; 0: never waits)")
    add("--max-batch-tokens", type=int, default=16384,
        help="tokens per predict call, across requests (default: 16384, TEI's)")
    add("--max-batch-requests", type=int, default=0,
        help="requests per predict call (default: 0, no limit; 1: one request at a time)")
    add("--max-client-batch-size", type=int, default=1000, help="documents (or pairs) per request (default: 1000)")
    add("--max-request-bytes", type=int, default=2_000_000, help="request body size limit (default: 2000000)")
    add("--max-queue", type=int, default=16384,
        help="pairs admitted and not yet scored; past it requests get 503 with Retry-After (default: 16384)")
    add("--api-key", default=os.environ.get("RERANK_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $RERANK_API_KEY, else off)")
    add("--no-compile", action="store_true", help="run the model eager: starts in seconds, slower per batch")
    add("--threads", type=int, default=0,
        help="torch CPU threads (default: 0, torch's choice; 1 helps on a CPU shared with other processes)")
    add("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"), help="log level")
    add("--benchmark", action="store_true", help="run the load benchmark instead of serving (see serve_bench.py)")
    import serve_bench

    serve_bench.add_flags(p)
    return p


def parse(argv=None) -> tuple[ServeConfig, argparse.Namespace, argparse.ArgumentParser]:
    """Flags -> ServeConfig; every invalid value exits 2 with one line."""
    p = parser()
    args = p.parse_args(argv)
    try:
        bench = benchmark.BenchConfig(**{k: getattr(args, k) for k in MODEL_FLAGS})
        names = [f.name for f in dataclasses.fields(ServeConfig) if f.name != "bench"]
        return ServeConfig(bench, **{k: getattr(args, k) for k in names}), args, p
    except ValueError as e:
        p.error(str(e))


def model_path(cfg: ServeConfig, p: argparse.ArgumentParser) -> str:
    """The model's directory, checked against the flags before anything starts (exit 2 otherwise)."""
    try:
        path = models.resolve_model(cfg.bench.model)
    except models.ModelNotFoundError as e:
        p.error(str(e))
    config = benchmark.model_config(path)
    if cfg.bench.max_length > (limit := benchmark.packing.position_limit(config)):
        p.error(f"max_length must be <= {limit} (the model's position limit), got {cfg.bench.max_length}")
    if getattr(config, "num_labels", 1) != 1:
        p.error(f"model {cfg.bench.model} has {config.num_labels} output labels; reranking needs 1")
    return path


# ---------------------------------------------------------------- request and response shapes


class Strict(BaseModel):
    # Strict: "3" is not an int and 1 is not a bool (a 422, not a silent coercion); unknown fields
    # are ignored, as the APIs this mirrors ignore them.
    model_config = ConfigDict(strict=True, extra="ignore")


class TeiRerank(Strict):
    """text-embeddings-inference POST /rerank."""

    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True


class TextDocument(Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    text: str


class ApiRerank(Strict):
    """Cohere v2 / Jina POST /v{1,2}/rerank. return_documents: None takes the route's default."""

    model: str | None = None
    query: str
    documents: list[str | TextDocument]
    top_n: int | None = None
    return_documents: bool | None = None


class ScorePairs(Strict):
    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]]  # JSON has no tuples: [text_a, text_b]
    raw_scores: bool = False
    truncate: bool = True


class ApiError(Exception):
    """-> {"error": message, "error_type": kind} with this status (and headers)."""

    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


class ClientGone(Exception):
    pass


# ---------------------------------------------------------------- the server's state


class Service:
    """What the routes share: limits, the scheduler (and its model's tokenizer), and facts for /info."""

    def __init__(self, cfg: ServeConfig, path: str):
        self.cfg, self.path = cfg, path
        self.metrics = Metrics()
        self.activation = None  # the model's, set once loaded: what predict applies by default
        self.info: dict[str, Any] = {}
        self.failed: BaseException | None = None
        self.scheduler = Scheduler(self._load, batch_size=cfg.bench.batch_size, max_batch_tokens=cfg.max_batch_tokens,
                                   max_batch_requests=cfg.max_batch_requests, max_wait_s=cfg.max_wait_ms / 1e3,
                                   max_queue=cfg.max_queue, metrics=self.metrics, on_failure=self._on_failure,
                                   join=lambda parts: parts[0].concat(parts))  # parts of encode_pairs' results
        self.on_fatal = lambda: None  # set by run(): stops the HTTP server, which then exits 1

    def _load(self):
        """Runs on the scheduler thread: load, warm up (compile), then the facts /info reports."""
        from dynamic_cross_encoder import DynamicCrossEncoder

        b = self.cfg.bench
        start = time.perf_counter()
        model = DynamicCrossEncoder(self.path, device=b.device, max_length=b.max_length,
                                    compile=not self.cfg.no_compile, model_kwargs={"dtype": b.torch_dtype},
                                    compile_mode=b.compile_mode, packed=b.packed,
                                    max_tokens_per_batch=b.max_tokens_per_batch)
        loaded = time.perf_counter() - start
        warm = model.warmup(batch_size=b.batch_size)
        self.activation = model.activation_fn
        limits = ("max_wait_ms", "max_batch_tokens", "max_batch_requests", "max_client_batch_size",
                  "max_request_bytes", "max_queue")
        self.info = dict(model=b.model, source=models.model_source(self.path), path=self.path, device=b.device,
                         dtype=str(model.model.dtype).removeprefix("torch."), attention=model.describe(),
                         max_length=model.max_seq_length, batch_size=b.batch_size, packed=model.packed,
                         max_tokens_per_batch=model.max_tokens_per_batch, threads=torch.get_num_threads(),
                         compile_mode=None if self.cfg.no_compile else model.compile_mode,
                         load_s=round(loaded, 3), warmup_s=round(warm, 3), versions=versions(),
                         limits={k: getattr(self.cfg, k) for k in limits})
        log.warning("ready: %s on %s, warm-up %.1f s", self.info["attention"], b.device, warm)
        return model

    def _on_failure(self, error: BaseException) -> None:
        """The model can no longer serve: /health fails and the server stops, to be restarted."""
        self.failed = error
        log.error("the model can no longer serve: %s", self.scheduler.failure, exc_info=error)
        self.on_fatal()

    def status(self) -> str:
        if self.failed is not None:
            return "failed"
        if self.scheduler.draining:
            return "draining"
        return "ok" if self.scheduler.ready.is_set() else "warming up"

    async def score(self, request: Request, pairs: list, *, field: str, truncate: bool, raw: bool):
        """-> ((n,) float32 scores in the pairs' order, tokens scored); raises ApiError."""
        cfg = self.cfg
        if len(pairs) > cfg.max_client_batch_size:
            raise ApiError(413, f"{field} has {len(pairs)} items, more than --max-client-batch-size "
                                f"{cfg.max_client_batch_size}", "payload_limit")
        if not self.scheduler.ready.is_set():
            raise ApiError(503, f"the model is {self.status()}", "unavailable", {"Retry-After": "1"})
        if not pairs:
            return np.zeros(0, dtype=np.float32), 0
        # the one tokenization of the request (the query once), on a worker thread: the scheduler's
        # thread only packs and runs the ids
        encoded = await asyncio.to_thread(self.scheduler.model.encode_pairs, pairs)
        full, limit = encoded.untruncated, cfg.bench.max_length
        if not truncate and (long := np.flatnonzero(full > limit)).size:
            i = int(long[0])
            raise ApiError(413, f"{field}[{i}] is {full[i]} tokens with the query, more than --max-length {limit}; "
                                "send truncate: true to cut it", "payload_limit")
        tokens = encoded.ids.lengths
        try:
            job = self.scheduler.submit(encoded, tokens)
        except QueueFull as e:
            raise ApiError(503, str(e), "overloaded", {"Retry-After": str(e.retry_after)}) from None
        except NotAccepting as e:
            raise ApiError(503, str(e), "unavailable", {"Retry-After": "1"}) from None
        try:
            logits = await until_disconnect(request, job.future)
        except ClientGone:
            self.scheduler.cancel(job)
            raise
        except ModelError as e:
            raise ApiError(500, str(e), "model") from None
        scores = logits if raw else self.activation(torch.from_numpy(logits)).numpy()
        return scores, int(tokens.sum())


async def until_disconnect(request: Request, future):
    """The future's result, or ClientGone as soon as the client hangs up (the body is read by then,
    so the next ASGI message is the disconnect)."""
    result = asyncio.wrap_future(future)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if result not in done:
        result.cancel()
        raise ClientGone
    return result.result()


async def server_failed(request, e: ServerFailed) -> JSONResponse:
    """503: the device's fault, not the request's; another replica (or this one, restarted) can score it."""
    return JSONResponse({"error": str(e), "error_type": "failed"}, status_code=503)


def versions() -> dict:
    names = ("torch", "transformers", "sentence-transformers", "tokenizers", "fastapi", "uvicorn", "pydantic",
             "prometheus-client")
    return {"python": platform.python_version(), **{n: _version(n) for n in names}}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_error(error: dict) -> str:
    """One pydantic error as one line naming the field and the value: `documents.3: Input should be a
    valid string, got 5`."""
    loc = [x for x in error["loc"] if x != "body"]
    if error["type"] == "json_invalid":
        return f"body: invalid JSON at character {loc[0] if loc else 0} ({error.get('ctx', {}).get('error', '')})"
    if not loc and isinstance(error.get("input"), (str, bytes)):  # form-encoded or text: no JSON parsed
        return "body: expected a JSON object; send the header 'Content-Type: application/json'"
    if loc and loc[-1] in ("str", "TextDocument"):  # one branch of `str | TextDocument`: name the union
        loc, msg = loc[:-1], "Input should be a string or an object with a string 'text'"
    else:
        msg = error["msg"]
    return f"{'.'.join(str(x) for x in loc) or 'body'}: {msg}, got {_short(error.get('input'))}"


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- the app


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        yield
        # uvicorn calls this once every connection is done; what is still queued is finished here
        await asyncio.to_thread(service.scheduler.stop)

    app = FastAPI(title="rerank", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse({"error": e.message, "error_type": e.kind}, status_code=e.status, headers=e.headers)

    app.add_exception_handler(ServerFailed, server_failed)
    @app.exception_handler(ClientGone)
    async def client_gone(request, e):
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        return JSONResponse({"error": describe_error(errors[0]) if errors else "invalid request",
                             "error_type": "validation", "detail": jsonable_encoder(errors)}, status_code=422)

    @app.post("/rerank")
    async def rerank(body: TeiRerank, request: Request):
        pairs = [(body.query, t) for t in body.texts]
        scores, _ = await service.score(request, pairs, field="texts", truncate=body.truncate, raw=body.raw_scores)
        return [{"index": int(i), "score": float(scores[i]), **({"text": body.texts[i]} if body.return_text else {})}
                for i in np.argsort(-scores, kind="stable")]

    async def api_rerank(body: ApiRerank, request: Request, version: int):
        if body.top_n is not None and body.top_n < 1:
            raise ApiError(400, f"top_n must be >= 1, got {body.top_n}", "invalid_request")
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        scores, tokens = await service.score(request, [(body.query, t) for t in texts], field="documents",
                                             truncate=True, raw=False)
        # Jina answers with the documents unless told not to; Cohere v2 never sends them by default
        with_docs = body.return_documents if body.return_documents is not None else version == 1
        results = [{"index": int(i), "relevance_score": float(scores[i]),
                    **({"document": {"text": texts[i]}} if with_docs else {})}
                   for i in np.argsort(-scores, kind="stable")[: body.top_n]]
        return {"id": str(uuid.uuid4()), "model": body.model or service.cfg.bench.model, "results": results,
                "meta": {"api_version": {"version": str(version)}, "billed_units": {"search_units": 1},
                         "tokens": {"input_tokens": tokens}},
                "usage": {"total_tokens": tokens}}

    @app.post("/v1/rerank")
    async def rerank_v1(body: ApiRerank, request: Request):
        return await api_rerank(body, request, 1)

    @app.post("/v2/rerank")
    async def rerank_v2(body: ApiRerank, request: Request):
        return await api_rerank(body, request, 2)

    @app.post("/score")
    async def score(body: ScorePairs, request: Request):
        scores, _ = await service.score(request, body.pairs, field="pairs", truncate=body.truncate, raw=body.raw_scores)
        return {"scores": scores.tolist()}

    @app.get("/health")
    async def health():
        status = service.status()
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/info")
    async def info():
        if not service.info:
            raise ApiError(503, f"the model is {service.status()}", "unavailable", {"Retry-After": "1"})
        return service.info

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Guard(app, service)


class Guard:
    """Plain ASGI around the app: request metrics by route and status, the API key (compared in
    constant time), and the body size limit, checked before the app parses anything."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        key = service.cfg.api_key
        self.expected = b"Bearer " + key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, start = 500, time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            reply, receive = await self._check(scope, receive)
            await (reply or self.app)(scope, receive, send_status)
        finally:
            m = self.service.metrics
            m.requests.labels(route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)

    async def _check(self, scope, receive):
        """-> (an error response or None, the receive the app reads the body from)."""
        headers = dict(scope["headers"])
        if self.expected and scope["path"] not in OPEN_ROUTES:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     "error_type": "unauthorized"}, 401, {"WWW-Authenticate": "Bearer"}), receive
        limit = self.service.cfg.max_request_bytes
        too_big = JSONResponse({"error": f"request body is larger than --max-request-bytes {limit}",
                                "error_type": "payload_limit"}, 413)
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > limit:
            return too_big, receive
        body, more = bytearray(), scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return Response(status_code=CLIENT_GONE), receive
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:  # a chunked body has no content-length
                return too_big, receive
        sent = False

        async def replay():  # the body once, then the client's own messages (its disconnect)
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return None, replay


def run(cfg: ServeConfig, path: str) -> int:
    """Serve until SIGTERM / Ctrl-C: stop accepting, finish what is queued; -> exit status."""
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    service = Service(cfg, path)
    app = create_app(service)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                           access_log=False, timeout_graceful_shutdown=None))
    service.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it drained on once it is done; this handler takes it then, so a
    # drained server exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: log.warning("drained; exiting"))
    server.run()
    return 1 if service.failed is not None else 0


def main(argv=None) -> int:
    cfg, args, p = parse(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.benchmark:
        import serve_bench

        return serve_bench.main(cfg, args, p)
    if cfg.log_level in ("info", "debug"):
        print("serving with " + ", ".join(f"{k}={getattr(cfg.bench, k)!r}" for k in MODEL_FLAGS), flush=True)
    return run(cfg, model_path(cfg, p))


if __name__ == "__main__":
    sys.exit(main())
