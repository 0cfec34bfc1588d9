"""Score pairs files of any size with DynamicCrossEncoder: in this process on one device, or with
one model per GPU (or CPU slot) of a Ray cluster.

    python score_pairs.py pairs.jsonl scores.parquet
    python score_pairs.py 'shards/*.parquet' scores.parquet --engine ray            # every local GPU
    python score_pairs.py shards/ scores.jsonl --engine ray --address 10.0.0.5:6379  # a running cluster
    python score_pairs.py pairs.jsonl --benchmark --num-workers 4                   # 1 vs 4 Ray workers

Flow: INPUT -> data.plan_pairs (one streaming pass: every record checked and numbered; a bad one
stops the run before any model loads) -> blocks -> Scorer (one DynamicCrossEncoder per worker; Ray
Data read -> map_batches) -> Sink on the driver (a temp file beside OUTPUT; a row already written
is dropped) -> closing check (every accepted record exactly once) -> rename to OUTPUT.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import data

HERE = os.path.dirname(os.path.abspath(__file__))
# predict sorts a call's pairs by token length before batching: 16 batches per call give the sort
# room to cut padding while a worker holds only a few MB of text.
CALL_BATCHES = 16
CHUNK_ROWS = 16384  # records per read task: the unit a reader restarts from
RETRIES = 3  # restarts of a dead worker, and retries of its lost batch, before the run fails
CRASH_ENV = "SCORE_PAIRS_CRASH_ONCE"  # fault injection for the tests: see Scorer.__call__
OUTPUT_FORMATS = (".parquet", ".jsonl")
DTYPES = ("auto", "bfloat16", "float16", "float32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
UPLOAD_EXCLUDES = [".git", ".venv", ".ci-venv", ".ci-cache", "results", "*.parquet", "*.jsonl", "*.tsv"]


class UsageError(ValueError):
    """A flag value or a file the user can fix: one line, exit code 2."""


@dataclass
class ScoreConfig:
    """How each worker builds and calls its model (shipped to Ray workers as is)."""

    model: str = "auto"
    model_path: str = ""  # models.resolve_model(model) on the driver; a worker without it resolves again
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 64
    max_length: int = 512
    packed: bool | None = None  # None: the device's default (packed on a CPU)
    max_tokens_per_batch: int | None = None
    compile: bool = True
    compile_mode: str | None = None


def blocks(chunks, rows_per_block: int, id_type: str | None):
    """Tables of up to rows_per_block accepted records: row (int64), id (the record's, else its row
    number), text_a, text_b. The local engine and every Ray read task use this."""
    buf = []
    for chunk in chunks:
        for number, rec in data.read_chunk(chunk):
            buf.append((number, number if id_type is None else rec.id, rec.text_a, rec.text_b))
            if len(buf) == rows_per_block:
                yield _table(buf, id_type)
                buf = []
    if buf:
        yield _table(buf, id_type)


def _table(buf: list[tuple], id_type: str | None) -> pa.Table:
    rows, ids, a, b = zip(*buf)
    return pa.table({"row": pa.array(rows, pa.int64()), "id": pa.array(ids, pa.string() if id_type == "str" else pa.int64()),
                     "text_a": pa.array(a, pa.string()), "text_b": pa.array(b, pa.string())})


class Scorer:
    """One DynamicCrossEncoder: the local engine's, or one per Ray worker (one GPU or CPU slot)."""

    def __init__(self, cfg: ScoreConfig, threads: int | None = None, crash_marker: str | None = None):
        import torch
        import transformers.utils.logging

        import models
        from dynamic_cross_encoder import DynamicCrossEncoder

        transformers.utils.logging.disable_progress_bar()  # a loading bar per worker is noise
        if threads:  # a CPU worker owns one slot; more threads would fight the other workers
            torch.set_num_threads(threads)
        path = cfg.model_path if os.path.isdir(cfg.model_path) else models.resolve_model(cfg.model)
        from benchmark import DEVICE_DEFAULTS  # the scripts' one dtype policy: bf16 on CUDA and on CPUs with native bf16

        auto = DEVICE_DEFAULTS["dtype"][0 if cfg.device.startswith("cuda") else 1]
        dtype = getattr(torch, auto if cfg.dtype == "auto" else cfg.dtype)
        self.model = DynamicCrossEncoder(
            path, device=cfg.device, max_length=cfg.max_length, model_kwargs={"dtype": dtype},
            compile=cfg.compile, compile_mode=cfg.compile_mode, packed=cfg.packed,
            max_tokens_per_batch=cfg.max_tokens_per_batch, local_files_only=True,
        )
        self.warmup_s = self.model.warmup(batch_size=cfg.batch_size) if cfg.compile else 0.0
        self.batch_size, self.crash_marker, self.calls = cfg.batch_size, crash_marker, 0
        ray = sys.modules.get("ray")  # imported in a Ray worker; the local engine needs none
        node = ray.get_runtime_context().get_node_id()[:8] if ray and ray.is_initialized() else "local"
        self.name = f"{node}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.crash_marker and self.calls == 2:
            # The worker-loss test: the first worker to create the marker dies in its second call,
            # mid-run, as an out-of-memory kill would; Ray restarts it and redoes the lost work.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(1)
        start = time.perf_counter()
        pairs = list(zip(batch["text_a"].to_pylist(), batch["text_b"].to_pylist()))
        scores = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        n, seconds = batch.num_rows, time.perf_counter() - start  # busy_s: summed per worker by the Sink
        return pa.table({"row": batch["row"], "id": batch["id"], "score": pa.array(np.asarray(scores, np.float32)),
                         "worker": pa.array([self.name] * n, pa.string()), "busy_s": np.full(n, seconds / max(n, 1))})


class Sink:
    """The one writer of OUTPUT: rows go to a hidden temp file beside it, renamed by close() once
    every accepted record is there exactly once; abort() leaves no OUTPUT."""

    def __init__(self, path: str, id_type: str | None, rows_in: int, progress: tqdm):
        self.path, self.progress, self.parquet = path, progress, path.endswith(".parquet")
        self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
        self.written = np.zeros(rows_in, dtype=bool)
        self.duplicates, self.workers = 0, {}  # worker -> [rows, busy seconds]
        self.schema = pa.schema([("id", pa.string() if id_type == "str" else pa.int64()), ("score", pa.float32())])
        self.out = pq.ParquetWriter(self.tmp, self.schema) if self.parquet else open(self.tmp, "w", encoding="utf-8")

    def write(self, table: pa.Table) -> None:
        rows = table["row"].to_numpy()
        fresh = ~self.written[rows]
        if not fresh.all():  # a retried block can repeat rows another attempt delivered: keep the first
            self.duplicates += int((~fresh).sum())
            table, rows = table.filter(pa.array(fresh)), rows[fresh]
        self.written[rows] = True
        out = pa.table({"id": table["id"].cast(self.schema.field("id").type), "score": table["score"]})
        if self.parquet:
            self.out.write_table(out, row_group_size=1 << 20)
        else:
            self.out.writelines(json.dumps({"id": i, "score": s}) + "\n"
                                for i, s in zip(out["id"].to_pylist(), out["score"].to_pylist()))
        for w in table.group_by("worker").aggregate([("row", "count"), ("busy_s", "sum")]).to_pylist():
            stats = self.workers.setdefault(w["worker"], [0, 0.0])
            stats[0], stats[1] = stats[0] + w["row_count"], stats[1] + w["busy_s_sum"]
        self.progress.update(table.num_rows)

    def close(self, plan: data.PairsPlan) -> int:
        """Check, then publish OUTPUT; returns the rows written."""
        self.out.close()
        expected = np.ones(plan.rows, dtype=bool)
        expected[[r.row for r in plan.rejects]] = False
        if (self.written != expected).any():
            raise RuntimeError(f"the engine returned {int(self.written.sum())} of {int(expected.sum())} rows "
                               f"({int((expected & ~self.written).sum())} missing); {self.path} not written")
        os.replace(self.tmp, self.path)
        return int(self.written.sum())

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.out.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


@contextlib.contextmanager
def ray_connection(address: str | None):
    """Join the cluster at `address`, or start a Ray instance on this machine (stopped at the end);
    in a process that already joined one (a notebook, the tests), use that one."""
    import ray

    # Workers on this machine import the project from here. With --address a checkout travels to
    # every node (an installed package, in site-packages, must be installed on them instead).
    here = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}}
    if ray.is_initialized():
        yield {"joined": "existing", "runtime_env": here}
        return
    if address:
        upload = None if HERE.endswith("-packages") else {"working_dir": HERE, "excludes": UPLOAD_EXCLUDES}
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=upload)
        conn = {"joined": address, "runtime_env": None}
    else:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        conn = {"joined": "local instance", "runtime_env": here, "local": True}
    try:
        yield conn
    finally:
        ray.shutdown()


def ray_workers(device: str, num_workers: int | None, conn: dict) -> tuple[bool, int]:
    """(one GPU per worker?, worker count) from the flags and the cluster's resources."""
    import ray

    if device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device {device!r}: with --engine ray each worker gets one GPU; use auto, cuda or cpu")
    gpus, cpus = (int(ray.cluster_resources().get(kind, 0)) for kind in ("GPU", "CPU"))
    if device == "cuda" and not gpus:
        raise UsageError("--device cuda: the Ray cluster has no GPUs; use --device cpu")
    use_gpu = device != "cpu" and gpus > 0
    have = gpus if use_gpu else cpus
    workers = num_workers or have
    if workers > have:
        what = f"--num-workers {workers}: the cluster has {have} {'GPUs' if use_gpu else 'CPUs'}"
        if conn.get("local"):
            raise UsageError(what)
        print(f"note: {what}; the run waits until it has them", file=sys.stderr)
    return use_gpu, workers


def _datasource(chunks, rows_per_block: int, id_type: str | None):
    import functools

    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PairsDatasource(Datasource):
        """One read task per chunk, on the driver's node: INPUT needs to exist only there."""

        supports_distributed_reads = property(lambda self: False)

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = [BlockMetadata(num_rows=c.rows - len(c.skip), size_bytes=None, exec_stats=None, input_files=[c.path])
                    for c in chunks]
            return [ReadTask(functools.partial(blocks, [c], rows_per_block, id_type), m) for c, m in zip(chunks, meta)]

    return PairsDatasource()


def run_ray(cfg: ScoreConfig, plan: data.PairsPlan, sink: Sink, *, use_gpu: bool, workers: int, conn: dict) -> None:
    """Ray Data: read (on this node) -> map_batches(Scorer), one actor per GPU or CPU slot -> the
    driver consumes the stream and writes. A dead actor is restarted and its lost batch redone."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's bar counts written rows
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    rows, chunks, env = cfg.batch_size * CALL_BATCHES, plan.chunks, conn["runtime_env"]
    # Ray merges a read task's output into blocks of target_max_block_size bytes (128 MiB), and a worker
    # scores a block alone: about one predict call's bytes per block instead (estimated from the files).
    per_call = rows * sum(map(os.path.getsize, plan.files)) // plan.rows
    saved, ctx.target_max_block_size = ctx.target_max_block_size, max(1 << 14, per_call)
    try:  # reads take no CPU slot (without GPUs every slot holds a model); concurrency bounds their lead
        ds = ray.data.read_datasource(_datasource(chunks, rows, plan.id_type), num_cpus=0, runtime_env=env,
                                      concurrency=min(len(chunks), workers + 1), override_num_blocks=len(chunks))
    finally:
        ctx.target_max_block_size = saved  # the dataset keeps its own copy of the context
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts / max_task_retries only as extra remote args, which it says go
        # away in 2.64 (requirements.txt stops below). A small INPUT warns it cannot feed every worker.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
        ds = ds.map_batches(
            Scorer, batch_size=rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={"cfg": replace(cfg, device="cuda" if use_gpu else "cpu"),
                                   "threads": None if use_gpu else 1, "crash_marker": os.environ.get(CRASH_ENV)},
            max_restarts=RETRIES, max_task_retries=RETRIES, runtime_env=env,
            **({"num_gpus": 1} if use_gpu else {"num_cpus": 1}),
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            sink.write(batch)


def expand_inputs(spec: str) -> list[str]:
    """A file, a directory (its pairs files by extension; hidden files and subdirectories are
    skipped) or a glob pattern -> absolute paths in sorted order."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in os.listdir(path) if not n.startswith(".")
                 and n.lower().endswith(data.PAIRS_EXTENSIONS) and os.path.isfile(os.path.join(path, n))]
    elif any(c in path for c in "*?["):
        files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    else:
        files = [path] if os.path.exists(path) else None
    if not files:
        raise UsageError(f"INPUT {spec}: " + ("no such file, directory or pattern" if files is None else
                                              f"no pairs files ({' '.join(data.PAIRS_EXTENSIONS)}) found"))
    return sorted(os.path.abspath(p) for p in files)


def check_output(output: str, files: list[str], overwrite: bool, what: str = "OUTPUT") -> str:
    output = os.path.abspath(os.path.expanduser(output))
    if what == "OUTPUT" and not output.endswith(OUTPUT_FORMATS):
        raise UsageError(f"OUTPUT {output}: must end in {' or '.join(OUTPUT_FORMATS)}")
    if output in files:
        raise UsageError(f"{what} {output} is also an input")
    if not os.path.isdir(os.path.dirname(output)):
        raise UsageError(f"{what} {output}: no such directory {os.path.dirname(output)}")
    if os.path.exists(output) and not overwrite:
        raise UsageError(f"{what} {output} exists; pass --overwrite to replace it")
    return output


def local_device(device: str) -> str:
    import torch

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r} needs CUDA, which this machine does not have; use --device cpu")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def score(cfg: ScoreConfig, plan: data.PairsPlan, output: str, *, engine: str, num_workers: int | None,
          address: str | None, quiet: bool, conn: dict | None = None) -> dict:
    """Score every accepted record of `plan` into `output`; returns the run's numbers."""
    start = time.perf_counter()
    bar = tqdm(total=plan.rows - len(plan.rejects), unit="pairs", desc="scoring", disable=quiet or not sys.stderr.isatty())
    sink = Sink(output, plan.id_type, plan.rows, bar)
    run = {"engine": engine, "num_workers": 1, "device": cfg.device, "cluster": None}
    try:
        if engine == "local":  # one process, one device: read a call's worth, score, write, repeat
            run["device"] = local_device(cfg.device)
            scorer = Scorer(replace(cfg, device=run["device"]))
            for block in blocks(plan.chunks, cfg.batch_size * CALL_BATCHES, plan.id_type):
                sink.write(scorer(block))
        else:
            with ray_connection(address) if conn is None else contextlib.nullcontext(conn) as c:
                use_gpu, workers = ray_workers(cfg.device, num_workers, c)
                run.update(num_workers=workers, device="cuda" if use_gpu else "cpu", cluster=c["joined"])
                run_ray(cfg, plan, sink, use_gpu=use_gpu, workers=workers, conn=c)
        rows_out = sink.close(plan)
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    workers = [{"worker": w, "rows": n, "busy_s": b, "pairs_per_s": n / b if b else None}
               for w, (n, b) in sorted(sink.workers.items())]
    return dict(run, rows_out=rows_out, duplicates_dropped=sink.duplicates, seconds=seconds,
                pairs_per_s=rows_out / seconds, workers=workers)


def run_benchmark(cfg: ScoreConfig, plan: data.PairsPlan, *, num_workers, address, quiet) -> dict:
    """The same input through the local engine (the reference scores), then Ray with 1 and N
    workers on one Ray connection: pairs/s, scaling efficiency and the score differences."""
    runs, reference = [], None
    with tempfile.TemporaryDirectory() as tmp, ray_connection(address) as c:
        n = ray_workers(cfg.device, num_workers, c)[1]
        for engine, workers in (("local", 1), ("ray", 1), ("ray", n)):
            out = os.path.join(tmp, f"{engine}-{workers}.parquet")
            run = score(cfg, plan, out, engine=engine, num_workers=workers, address=address, quiet=quiet, conn=c)
            scores = pq.read_table(out).sort_by("id")["score"].to_numpy().astype(np.float64)
            reference = scores if reference is None else reference
            runs.append(dict(run, max_abs_diff_vs_local=float(np.abs(scores - reference).max())))
    one, many = runs[1]["pairs_per_s"], runs[2]["pairs_per_s"]
    print(f"{'run':<20}{'workers':>8}{'rows':>9}{'seconds':>9}{'pairs/s':>9}{'per worker':>12}{'max|diff|':>11}")
    for r in runs:
        per = np.mean([w["pairs_per_s"] for w in r["workers"] if w["pairs_per_s"]])
        name = "local (one process)" if r["engine"] == "local" else f"ray ({r['device']})"
        print(f"{name:<20}{r['num_workers']:>8}{r['rows_out']:>9}{r['seconds']:>9.1f}{r['pairs_per_s']:>9.1f}"
              f"{per:>12.1f}{r['max_abs_diff_vs_local']:>11.1e}")
    print(f"scaling 1 -> {n} Ray workers: {many / one:.2f}x, efficiency {many / (n * one):.0%} (seconds include "
          "worker start, model load and warm-up; per worker: pairs/s while scoring)")
    return {"runs": runs, "speedup": many / one, "scaling_efficiency": many / (n * one)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block: the flags are in --help
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Score query-document pairs with DynamicCrossEncoder, locally or on a Ray cluster")
    add = p.add_argument
    add("input", metavar="INPUT", help="pairs file, directory of them, or quoted glob: .jsonl, .tsv, .parquet")
    add("output", metavar="OUTPUT", nargs="?", help="scores (id, score): .parquet or .jsonl; not with --benchmark")
    add("--engine", default="local", choices=("local", "ray"), help="local (default): this process, one device; ray: Ray Data workers")
    add("--num-workers", type=int, default=None, help="ray: workers, one GPU (or CPU slot) each (default: all the cluster has)")
    add("--address", default=None, help="ray: join a running cluster (host:port); default: start one on this machine")
    add("--model", default="auto", help="'auto' (default), hub id, local dir, 'synthetic[-tiny]' or 'synthetic-<family>[-tiny]'")
    add("--device", default="auto", help="'auto' (default: cuda if available), 'cuda', 'cuda:N' (local engine) or 'cpu'")
    add("--dtype", default="auto", choices=DTYPES, help="'auto' (default) = bfloat16 on CUDA; on a CPU bfloat16 "
        "where it is native (AVX-512 BF16 or AMX), else float32")
    add("--batch-size", type=int, default=64, help="pairs per predict batch (default: 64)")
    add("--max-length", type=int, default=512, help="truncate each pair to this many tokens (default: 512)")
    add("--packed", action=argparse.BooleanOptionalAction, default=None,
        help="padding-free packed batches; --no-packed: x16 buckets (default: packed on CPU, x16 buckets on CUDA)")
    add("--max-tokens-per-batch", type=int, default=None, help="token budget per packed batch (default: 16384 on CUDA, 4096 on CPU)")
    add("--no-compile", action="store_true", help="eager forward: no torch.compile and no warm-up")
    add("--compile-mode", default=None, choices=COMPILE_MODES, help="torch.compile mode (default: max-autotune on CUDA, default on CPU)")
    add("--skip-bad", action="store_true", help="write malformed records to the rejects file and go on, instead of stopping")
    add("--rejects", default=None, help="rejects file with --skip-bad (default: OUTPUT.rejects.jsonl)")
    add("--overwrite", action="store_true", help="replace an existing OUTPUT (and rejects file)")
    add("--json", dest="json_path", default=None, help="also write the summary as JSON to this path")
    add("--quiet", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)")
    add("--benchmark", action="store_true", help="time INPUT on the local engine, then on Ray with 1 and N workers")
    return p


def main(input: str, output: str | None = None, *, engine: str = "local", num_workers: int | None = None,
         address: str | None = None, model: str = "auto", device: str = "auto", dtype: str = "auto",
         batch_size: int = 64, max_length: int = 512, packed: bool | None = None, max_tokens_per_batch: int | None = None,
         no_compile: bool = False, compile_mode: str | None = None, skip_bad: bool = False, rejects: str | None = None,
         overwrite: bool = False, json_path: str | None = None, quiet: bool = False, benchmark: bool = False) -> dict:
    """Check what a user can get wrong (UsageError, data.PairsFileError, models.ModelNotFoundError),
    then score; returns the summary (also printed, and written to json_path)."""
    import models

    for name, value in (("batch-size", batch_size), ("max-length", max_length), ("num-workers", num_workers),
                        ("max-tokens-per-batch", max_tokens_per_batch)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    if max_length > 1024:
        raise UsageError(f"--max-length must be <= 1024 (the XLM-R position limit), got {max_length}")
    if engine == "local" and not benchmark and (num_workers or address):
        raise UsageError("--num-workers and --address need --engine ray")
    if benchmark == bool(output):
        raise UsageError("--benchmark writes no OUTPUT" if benchmark else "OUTPUT is required (or --benchmark)")
    files = expand_inputs(input)
    output = check_output(output, files, overwrite) if output else None
    if skip_bad and not (output or rejects):
        raise UsageError("--skip-bad with --benchmark needs --rejects PATH")
    rejects = check_output(rejects or f"{output}.rejects.jsonl", files, overwrite, "rejects file") if skip_bad else None
    if engine == "local" or benchmark:
        local_device(device)
    start = time.perf_counter()
    plan = data.plan_pairs(files, chunk_rows=CHUNK_ROWS, skip_bad=skip_bad)  # a bad record stops here
    plan_s = time.perf_counter() - start
    if plan.rows == 0:
        raise UsageError(f"INPUT {input}: no pairs found")
    if rejects:
        with open(rejects, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"file": r.path, "line": r.lineno, "row": r.row, "reason": r.reason}) + "\n"
                         for r in plan.rejects)
    path = models.resolve_model(model)
    cfg = ScoreConfig(model, path, device, dtype, batch_size, max_length, packed, max_tokens_per_batch, not no_compile, compile_mode)
    source = models.model_source(path)
    print(f"score_pairs: {plan.rows} records in {len(files)} file(s), {len(plan.rejects)} rejected; model: {source}")
    print(f"  {cfg}")
    kw = dict(num_workers=num_workers, address=address, quiet=quiet)
    result = run_benchmark(cfg, plan, **kw) if benchmark else score(cfg, plan, output, engine=engine, **kw)
    report = dict(result, complete=True, inputs=files, output=output, rejects_file=rejects, rows_in=plan.rows,
                  rows_rejected=len(plan.rejects), plan_s=plan_s, model=model, model_source=source,
                  random_weights=models.is_synthetic(path), config=asdict(cfg), versions=versions())
    if not benchmark:
        print(summary_line(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def versions() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **{n: importlib.metadata.version(n) for n in ("transformers", "sentence-transformers", "ray", "pyarrow", "numpy")}}


def summary_line(r: dict) -> str:
    per = ", ".join(f"{w['pairs_per_s']:.1f}" for w in r["workers"] if w["pairs_per_s"])
    line = (f"scored {r['rows_out']} of {r['rows_in']} rows ({r['rows_rejected']} rejected) -> {r['output']} in "
            f"{r['seconds']:.1f} s: {r['pairs_per_s']:.1f} pairs/s overall; {len(r['workers'])} worker(s), "
            f"{per} pairs/s each while scoring; model: {r['model_source']}")
    return line + ("; RANDOM weights: the scores are not meaningful" if r["random_weights"] else "")


def cli(argv=None) -> dict:
    """The command line: a bad flag or input exits 2 with one line, no traceback."""
    import models

    p = build_parser()
    args = p.parse_args(argv)
    try:
        return main(**vars(args))
    except (UsageError, data.PairsFileError, models.ModelNotFoundError) as e:
        p.error(str(e))
    except KeyboardInterrupt:
        print("interrupted: OUTPUT not written", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    # Through the module's own name, so Ray pickles Scorer and blocks by reference (workers import
    # them from the project) rather than by value from __main__.
    import score_pairs

    score_pairs.cli()
