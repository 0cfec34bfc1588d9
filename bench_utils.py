"""Timing harness and report for the cross-encoder benchmarks.

The protocol is the original one: untimed warm-up calls, then one timed call per
workload (fresh inputs per run: the caller seeds each workload differently),
`torch.cuda.synchronize()` before and after each call, mean +- std over the last 5
runs. Everything a run measures goes into one report dict; the text table, the
markdown table, the JSON file and the plot are all made from that dict, so
`python bench_utils.py --markdown results/x.json` regenerates a README table.

This module imports no other project file: it takes callables and numbers.

Report layout (times in seconds, memory in bytes, FLOPs as counts; `None` where
unknown, and JSON writes `null` for None and NaN):

    {
      "complete": bool,            # False until the last setup finished; call
                                   # write_json() after each setup
      "config": {...},             # dataclasses.asdict(BenchConfig)
      "environment": {...},        # environment(): GPU/CPU name, versions, timestamp_utc
      "model_source": str,         # e.g. "random-weight synthetic twin (...)"
      "workload": {...},           # workload_summary(): numbers *per timed call*
                                   #   kind ("pairs"|"rerank"), calls, pairs, real_tokens,
                                   #   mean_tokens_per_pair, max_tokens_per_pair, flops
      "compute": {...} | None,     # compute_floor(): gemm (measure_gemm_tflops() dict),
                                   #   tflops, flops, floor_s (per timed call)
      "setups": [                  # add_setup(); the baseline is the setup with
        {                          # "baseline": True, else the first one
          "name": str, "baseline": bool, "complete": bool,
          "sorted": run, "unsorted": run,    # pairs workload (either may be absent)
          "latency": run,                    # rerank workload: one timed call per query
          "primary": "unsorted" | "sorted" | "latency",   # what time_s is taken from
          "time_s": float,         # mean seconds per timed call of the primary run
          "pairs_per_s", "tokens_per_s", "x_floor", "mfu",
          "p50_s", "p90_s", "p99_s", "queries_per_s",     # rerank only
          "warmup_s",              # summed over the runs unless given
          # anything else passed to add_setup() is stored as given, e.g.
          # compile_s, padding_efficiency, peak_mem_bytes, host_s, forward_s,
          # max_abs_diff, mean_abs_diff, kendall_tau, top10_overlap, attention
        }, ...],
      "notes": [str, ...],
    }

    run = run_timed() result: {"name", "times", "summary" (summarize() or None),
           "warmup_s", "warmup_calls", "runs_planned", "complete"}

A run script, in short:

    cfg = BenchConfig(**vars(args)); print(cfg)
    report = new_report(cfg, environment=environment(device, dtype),
                        model_source=src, workload=workload_summary("pairs", lengths))
    report["compute"] = compute_floor(report["workload"]["flops"],
                                      measure_gemm_tflops(device, dtype))
    for name, fn in setups:
        runs = {o: run_timed(f"{name} ({o})", fn, workloads[o], device=device,
                             warmup_calls=cfg.resolved_warmup(device)) for o in cfg.orders()}
        add_setup(report, name, **runs, compile_s=..., max_abs_diff=...)
        write_json(report, cfg.json)        # an interrupted run still leaves a file
    report["complete"] = True; write_json(report, cfg.json); print(format_table(report))
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

ORDERS = ("sorted", "unsorted")
WORKLOADS = ("pairs", "rerank")
DTYPES = ("auto", "bfloat16", "float16", "float32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LAST_N = 5  # the original reported mean +- std over the last 5 of 10 runs


def _opt(kind, help, **kw):
    return {"type": kind, "help": help, **kw}


@dataclass
class BenchConfig:
    """Every knob of a benchmark run, in one place; `print(cfg)` at start."""

    model: str = field(default="auto",
        metadata=_opt(str, "hub id, local dir, 'synthetic' or 'synthetic-tiny'"))
    device: str = field(default="auto",
        metadata=_opt(str, "'auto' (cuda if available), 'cuda', 'cuda:N' or 'cpu'"))
    dtype: str = field(default="auto",
        metadata=_opt(str, "'auto' = bfloat16 on CUDA, float32 on CPU", choices=DTYPES))
    batch_size: int = field(default=64, metadata=_opt(int, "pairs per predict batch"))
    num_pairs: int = field(default=1024, metadata=_opt(int, "pairs per timed run (pairs workload)"))
    runs: int = field(default=10, metadata=_opt(int, "timed runs; mean +- std over the last 5"))
    warmup: int | None = field(default=None,
        metadata=_opt(int, "untimed warm-up calls (default: 10 on CUDA, 2 on CPU)"))
    max_length: int = field(default=512, metadata=_opt(int, "truncate each pair to this many tokens"))
    order: str = field(default="both",
        metadata=_opt(str, "input order of the pairs workload", choices=ORDERS + ("both",)))
    compile_mode: str | None = field(default=None,
        metadata=_opt(str, "torch.compile mode (default: the script's choice)", choices=COMPILE_MODES))
    workload: str = field(default="pairs",
        metadata=_opt(str, "'pairs': random pairs per run; 'rerank': 1 query x N docs per call", choices=WORKLOADS))
    num_queries: int = field(default=100, metadata=_opt(int, "queries (rerank workload)"))
    docs_per_query: int = field(default=100, metadata=_opt(int, "documents per query (rerank workload)"))
    pairs_file: str | None = field(default=None,
        metadata=_opt(str, "your own pairs (.jsonl with query/document or .tsv) instead of random ones"))
    packed: bool = field(default=False, metadata=_opt(bool, "padding-free packed batches"))
    max_tokens_per_batch: int = field(default=16384, metadata=_opt(int, "token budget per packed batch"))
    check_fp32: bool = field(default=False,
        metadata=_opt(bool, "also compare scores against an fp32 reference"))
    json: str | None = field(default=None,
        metadata=_opt(str, "write the report as JSON to this path (rewritten after each setup)"))
    markdown: bool = field(default=False, metadata=_opt(bool, "also print the table as GitHub markdown"))
    plot: str | None = field(default=None, metadata=_opt(str, "save a latency bar chart (PNG) to this path"))
    quiet: bool = field(default=False, metadata=_opt(bool, "no progress bars"))
    seed: int = field(default=0,
        metadata=_opt(int, "seed of the first workload; run r uses seed + r * num_pairs"))

    def __post_init__(self):
        for name in ("batch_size", "num_pairs", "runs", "max_length", "num_queries",
                     "docs_per_query", "max_tokens_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")

    def resolved_warmup(self, device) -> int:
        if self.warmup is not None:
            return self.warmup
        return 10 if _is_cuda(device) else 2  # CPU runs are slow and do not compile kernels per shape

    def orders(self) -> tuple[str, ...]:
        return ORDERS if self.order == "both" else (self.order,)

    def describe(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        lines = [f"  {f.name:<{width}} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)]
        return "BenchConfig\n" + "\n".join(lines)

    __str__ = describe


def add_bench_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> argparse.ArgumentParser:
    """One flag per BenchConfig field (`--batch-size`, ...), with help= and choices=.

    `BenchConfig(**vars(parser.parse_args()))` then builds the config; catch its
    ValueError and call `parser.error(str(e))` for an exit code of 2.
    """
    for f in dataclasses.fields(BenchConfig):
        if f.name in exclude:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if meta["type"] is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
        else:
            parser.add_argument(flag, dest=f.name, type=meta["type"], default=f.default,
                                choices=meta.get("choices"), help=f"{meta['help']} (default: {f.default})")
    return parser


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if _is_cuda(device) else torch.float32
    return getattr(torch, name)


# ---------------------------------------------------------------- timing


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    """Wait for queued GPU work; without this a timer measures kernel launches only."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def time_call(fn: Callable[[], Any], device) -> float:
    """Seconds for one call of fn(), GPU work included."""
    return _timed(fn, device)[0]


def summarize(times: Sequence[float], last: int = LAST_N) -> dict:
    """Statistics over the last `last` times (all of them if fewer).

    std is the population std (ddof=0), as the original's np.std. median/min/max are
    over the same window, so one row describes one set of runs; all_times keeps every run.
    """
    if len(times) == 0:
        raise ValueError("summarize() needs at least one time")
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    window = np.asarray(times[-last:], dtype=np.float64)
    return {
        "mean": float(window.mean()),
        "std": float(window.std()),
        "median": float(np.median(window)),
        "min": float(window.min()),
        "max": float(window.max()),
        "n": int(window.size),
        "n_total": len(times),
        "all_times": [float(t) for t in times],
    }


def run_timed(name: str, fn: Callable[[Any], Any], workloads: Sequence[Any], *, device,
              warmup_calls: int, progress: bool = True, warmup_workloads: Sequence[Any] | None = None,
              keep_outputs: bool = False) -> dict:
    """Warm up, then time one `fn(workload)` call per workload, in order.

    Warm-up calls cycle through `warmup_workloads` (default: `workloads`); their total
    wall time is `warmup_s` and is never part of `times`. Ctrl-C stops the loop: the
    finished runs are kept and `complete` is False, so the caller can still write its report.
    With keep_outputs, "outputs" holds fn's return values (add_setup drops it).
    """
    warm = list(warmup_workloads) if warmup_workloads is not None else list(workloads)
    if warmup_calls > 0 and not warm:
        raise ValueError("warm-up needs at least one workload")
    show = progress and sys.stderr.isatty()
    result = {"name": name, "times": [], "summary": None, "warmup_s": 0.0, "warmup_calls": 0,
              "runs_planned": len(workloads), "complete": False}
    outputs = []
    bar = None
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=warmup_calls, desc=f"{name} warm-up", disable=not show, leave=False)
        for i in range(warmup_calls):
            fn(warm[i % len(warm)])
            result["warmup_calls"] += 1
            bar.update(1)
        sync(device)
        result["warmup_s"] = time.perf_counter() - t0
        t0 = None  # warm-up done
        bar.close()
        bar = tqdm(total=len(workloads), desc=name, disable=not show, leave=False)
        for workload in workloads:
            seconds, out = _timed(lambda: fn(workload), device)
            result["times"].append(seconds)
            if keep_outputs:
                outputs.append(out)
            bar.update(1)
        result["complete"] = True
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted, keeping {len(result['times'])} of {len(workloads)} timed runs",
              file=sys.stderr)
        if t0 is not None:  # interrupted during warm-up
            result["warmup_s"] = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    if result["times"]:
        result["summary"] = summarize(result["times"])
    if keep_outputs:
        result["outputs"] = outputs
    return result


# ---------------------------------------------------------------- efficiency


def throughput(pairs: float, real_tokens: float, seconds: float) -> dict:
    return {"pairs_per_s": pairs / seconds, "tokens_per_s": real_tokens / seconds}


def padding_efficiency(real_tokens: int, padded_tokens: int) -> float:
    """Fraction of the tokens the GPU processed that were real (1.0 = no padding)."""
    return real_tokens / padded_tokens


def flops_per_sequence(length: int, *, hidden: int = 768, intermediate: int = 3072, layers: int = 12) -> float:
    """Forward FLOPs of one encoder pass over `length` tokens.

    Per layer: dense 2*L*(4h^2 + 2h*i) (q, k, v, out projections and the two MLP
    matrices, 2 FLOPs per multiply-add) plus attention 4*L^2*h (QK^T and PV).
    Embeddings and the classifier head are left out (negligible).
    """
    per_layer = 2 * length * (4 * hidden**2 + 2 * hidden * intermediate) + 4 * length**2 * hidden
    return float(layers * per_layer)


def workload_flops(lengths: Sequence[int], **dims) -> float:
    """Sum of flops_per_sequence over sequences of the given token lengths (no padding)."""
    return float(sum(flops_per_sequence(int(n), **dims) for n in lengths))


def workload_summary(kind: str, lengths_per_call: Sequence[Sequence[int]], **dims) -> dict:
    """The report's "workload": means per timed call of pairs, real tokens and FLOPs.

    lengths_per_call: one list of per-pair token lengths (after truncation) per timed call.
    """
    if kind not in WORKLOADS:
        raise ValueError(f"kind must be one of {', '.join(WORKLOADS)}, got {kind!r}")
    if not lengths_per_call or not all(len(ls) for ls in lengths_per_call):
        raise ValueError("lengths_per_call needs at least one non-empty list")
    all_lengths = [int(n) for ls in lengths_per_call for n in ls]
    calls = len(lengths_per_call)
    return {
        "kind": kind,
        "calls": calls,
        "pairs": len(all_lengths) / calls,
        "real_tokens": sum(all_lengths) / calls,
        "mean_tokens_per_pair": sum(all_lengths) / len(all_lengths),
        "max_tokens_per_pair": max(all_lengths),
        "flops": sum(workload_flops(ls, **dims) for ls in lengths_per_call) / calls,
    }


# The model's GEMMs for T tokens: fused qkv, attention out, MLP up, MLP down (M, K, N).
def model_gemm_shapes(tokens: int, hidden: int = 768, intermediate: int = 3072) -> list[tuple[int, int, int]]:
    return [(tokens, hidden, 3 * hidden), (tokens, hidden, hidden),
            (tokens, hidden, intermediate), (tokens, intermediate, hidden)]


def measure_gemm_tflops(device, dtype=torch.bfloat16, shapes=None, iters: int | None = None) -> dict:
    """Matmul throughput at this model's shapes, measured in this process.

    CUDA: the given dtype, T=16384 tokens, CUDA events around `iters` back-to-back
    matmuls after warm-up. CPU: fp32, T=1024, a few iterations (~1 s); labelled as
    indicative only, it is no GPU floor. "tflops" is total FLOPs / total time over the
    shapes, i.e. the rate at which one layer's dense work runs.
    """
    cuda = _is_cuda(device)
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    if not cuda:
        dtype = torch.float32  # CPU half-precision matmuls are emulated and say nothing useful
    # CPU: at T=256 the GEMMs ran at half their rate at T=1024 (35 vs 68 GFLOP/s on 2 cores), which
    # put the setups "under the floor"; T=1024 is the steady rate and takes ~1 s.
    shapes = shapes or model_gemm_shapes(16384 if cuda else 1024)
    iters = iters or (50 if cuda else 3)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(3):  # cuBLAS picks its kernel and the clocks ramp up
            a @ b
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(iters):
                a @ b
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1e3 / iters
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ b
            seconds = (time.perf_counter() - t0) / iters
        flops = 2.0 * m * k * n
        rows.append({"m": m, "k": k, "n": n, "flops": flops, "seconds": seconds, "tflops": flops / seconds / 1e12})
    tflops = sum(r["flops"] for r in rows) / sum(r["seconds"] for r in rows) / 1e12
    dname = str(dtype).removeprefix("torch.")
    if cuda:
        label = f"measured {dname} GEMM at model shapes on {torch.cuda.get_device_name(device)}"
    else:
        label = f"CPU {dname} GEMM at T={shapes[0][0]} (indicative only, not a GPU floor)"
    return {"device": "cuda" if cuda else "cpu", "dtype": dname, "iters": iters,
            "shapes": rows, "tflops": tflops, "label": label}


def floor_seconds(flops: float, tflops: float) -> float:
    """Time the FLOPs take at the measured GEMM rate: no run can be faster."""
    return flops / (tflops * 1e12)


def compute_floor(flops: float, gemm: dict) -> dict:
    """The report's "compute" entry for a workload of `flops` per timed call."""
    return {"gemm": gemm, "tflops": gemm["tflops"], "flops": flops,
            "floor_s": floor_seconds(flops, gemm["tflops"]), "label": gemm["label"]}


# ---------------------------------------------------------------- environment and memory


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, dtype) -> dict:
    """Hardware and versions for the report; nothing that names the machine or the user."""
    cuda = _is_cuda(device)
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    env = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "sentence_transformers": _version("sentence-transformers"),
        "tokenizers": _version("tokenizers"),
        "numpy": np.__version__,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn"),
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return env


def reset_peak_memory(device) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> int | None:
    """Bytes of GPU memory allocated at the peak since reset_peak_memory(); None on CPU."""
    return torch.cuda.max_memory_allocated(device) if _is_cuda(device) else None


# ---------------------------------------------------------------- latency and agreement


def percentiles(times: Sequence[float]) -> dict:
    """p50/p90/p99 of per-call latencies (seconds), numpy's linear interpolation."""
    if len(times) == 0:
        raise ValueError("percentiles() needs at least one time")
    p50, p90, p99 = np.percentile(np.asarray(times, dtype=np.float64), [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def queries_per_s(times: Sequence[float]) -> float:
    return len(times) / float(sum(times))


def _vectors(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a.float().cpu() if torch.is_tensor(a) else a, dtype=np.float64).ravel()
    b = np.asarray(b.float().cpu() if torch.is_tensor(b) else b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"score lists differ in length: {a.size} vs {b.size}")
    return a, b


def score_diff(a, b) -> dict:
    """max and mean |a - b| between two score lists for the same pairs, same order."""
    a, b = _vectors(a, b)
    diff = np.abs(a - b)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}


def kendall_tau(a, b) -> float:
    """Kendall's tau-b between two score lists (1 = same ranking, -1 = reversed).

    NaN when either list is constant or shorter than 2: there is no ranking to compare.
    """
    from scipy.stats import kendalltau  # a sentence-transformers dependency; imported late to keep import light

    a, b = _vectors(a, b)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(kendalltau(a, b)[0])


def top_k_overlap(a, b, k: int = 10) -> float:
    """Fraction of the k best-scored indices of `a` that are also among the k best of `b`."""
    a, b = _vectors(a, b)
    k = min(k, a.size)
    if k < 1:
        raise ValueError("top_k_overlap() needs k >= 1 and non-empty scores")
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def ranking_agreement(scores_a: Sequence, scores_b: Sequence, k: int = 10) -> dict:
    """Mean Kendall tau and top-k overlap over queries (lists of per-query score lists)."""
    taus = [kendall_tau(a, b) for a, b in zip(scores_a, scores_b, strict=True)]
    tops = [top_k_overlap(a, b, k) for a, b in zip(scores_a, scores_b, strict=True)]
    tau = float(np.nanmean(taus)) if not all(math.isnan(t) for t in taus) else float("nan")
    return {"kendall_tau": tau, f"top{k}_overlap": float(np.mean(tops))}


# ---------------------------------------------------------------- the report


def new_report(config: BenchConfig | dict, *, environment: dict, model_source: str, workload: dict,
               compute: dict | None = None, notes: Sequence[str] = ()) -> dict:
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {"complete": False, "config": cfg, "environment": environment, "model_source": model_source,
            "workload": workload, "compute": compute, "setups": [], "notes": list(notes)}


def _num(x) -> float | None:
    """A finite float, or None for missing / NaN (so a dict and its JSON read the same)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def add_setup(report: dict, name: str, *, sorted: dict | None = None, unsorted: dict | None = None,
              latency: dict | None = None, baseline: bool = False, **extras) -> dict:
    """Append one setup with its derived numbers; returns it.

    Pass `sorted`/`unsorted` runs for the pairs workload or `latency` (one timed call per
    query) for rerank. The primary time (unsorted when present: real inputs arrive
    unsorted) gives pairs/s, tokens/s, x floor and MFU against report["workload"] and
    report["compute"]. `extras` are stored as given (compile_s, max_abs_diff, ...).
    """
    runs = {k: {key: v for key, v in run.items() if key != "outputs"}
            for k, run in (("sorted", sorted), ("unsorted", unsorted), ("latency", latency)) if run is not None}
    if not runs:
        raise ValueError(f"setup {name!r} needs a sorted, unsorted or latency run")
    setup: dict[str, Any] = {"name": name, "baseline": baseline, **runs}
    setup["complete"] = all(run["complete"] for run in runs.values())
    setup["warmup_s"] = sum(run["warmup_s"] for run in runs.values())
    primary = next(k for k in ("latency", "unsorted", "sorted") if k in runs)
    setup["primary"] = primary
    times = runs[primary]["times"]
    if primary == "latency":
        time_s = float(np.mean(times)) if times else None  # every query counts, not the last 5
        if times:
            setup.update({f"{p}_s": v for p, v in percentiles(times).items()})
            setup["queries_per_s"] = queries_per_s(times)
    else:
        summary = runs[primary]["summary"]
        time_s = summary["mean"] if summary else None
    setup["time_s"] = time_s
    workload, compute = report.get("workload") or {}, report.get("compute") or {}
    if time_s:
        if workload.get("pairs") and workload.get("real_tokens") is not None:
            setup.update(throughput(workload["pairs"], workload["real_tokens"], time_s))
        if compute.get("floor_s"):
            setup["x_floor"] = time_s / compute["floor_s"]
            setup["mfu"] = compute["floor_s"] / time_s
    setup.update(extras)
    report["setups"].append(setup)
    return setup


def _baseline(report: dict) -> dict | None:
    setups = report.get("setups") or []
    return next((s for s in setups if s.get("baseline")), setups[0] if setups else None)


def _run_cell(setup: dict, order: str) -> str:
    run = setup.get(order)
    if not run or not run.get("summary"):
        return "-"
    s = run["summary"]
    return f"{s['mean']:.4f} ± {s['std']:.4f}" + ("" if run.get("complete", True) else "*")


def _fmt(x, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    x = _num(x)
    return "-" if x is None else f"{x * scale:{spec}}{suffix}"


def _columns(report: dict) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell function) for every column this report has data for."""
    base = _baseline(report)
    base_t = _num(base.get("time_s")) if base else None

    def speedup(s):
        t = _num(s.get("time_s"))
        return "-" if not (t and base_t) else f"{base_t / t:.2f}x"

    kind = (report.get("workload") or {}).get("kind", "pairs")
    setups = report.get("setups") or []
    cols: list[tuple[str, Callable[[dict], str]]] = [("Setup", lambda s: str(s["name"]))]
    if kind == "rerank":
        cols += [(f"{p} (ms)", lambda s, p=p: _fmt(s.get(f"{p}_s"), ".1f", scale=1e3)) for p in ("p50", "p90", "p99")]
        cols.append(("queries/s", lambda s: _fmt(s.get("queries_per_s"), ",.1f")))
    else:
        for order in ORDERS:
            if any(order in s for s in setups):
                cols.append((f"{order.capitalize()} Inputs (s)", lambda s, o=order: _run_cell(s, o)))
    cols.append(("Speedup", speedup))
    optional = [
        ("max |score diff|", "max_abs_diff", lambda v: _fmt(v, ".1e")),
        ("vs fp32", "fp32_max_abs_diff", lambda v: _fmt(v, ".1e")),
        ("tau", "kendall_tau", lambda v: _fmt(v, ".4f")),
        ("top-10", "top10_overlap", lambda v: _fmt(v, ".2f")),
        ("pairs/s", "pairs_per_s", lambda v: _fmt(v, ",.0f")),
        ("tokens/s", "tokens_per_s", lambda v: _fmt(v, ",.0f")),
        ("pad eff.", "padding_efficiency", lambda v: _fmt(v, ".0%")),
        ("x floor", "x_floor", lambda v: _fmt(v, ".2f", "x")),
        ("MFU", "mfu", lambda v: _fmt(v, ".0%")),
        ("host (s)", "host_s", lambda v: _fmt(v, ".4f")),
        ("forward (s)", "forward_s", lambda v: _fmt(v, ".4f")),
        ("peak mem (GiB)", "peak_mem_bytes", lambda v: _fmt(v, ".2f", scale=2.0**-30)),
        ("compile (s)", "compile_s", lambda v: _fmt(v, ".1f")),
    ]
    for header, key, fmt in optional:
        if any(_num(s.get(key)) is not None for s in setups):
            cols.append((header, lambda s, key=key, fmt=fmt: fmt(s.get(key))))
    return cols


def _preamble(report: dict) -> list[str]:
    cfg, env, wl = report.get("config") or {}, report.get("environment") or {}, report.get("workload") or {}
    kind = wl.get("kind", cfg.get("workload", "pairs"))
    if kind == "rerank":
        what = f"rerank workload, {cfg.get('num_queries')} queries x {cfg.get('docs_per_query')} documents"
    else:
        what = f"pairs workload, {_fmt(wl.get('pairs'), '.0f')} pairs per run"
    hw = env.get("gpu") or f"CPU ({env.get('cpu')})"
    lines = [
        f"Cross-encoder benchmark: {what}, batch {cfg.get('batch_size')}, max_length {cfg.get('max_length')}, "
        f"{env.get('dtype', cfg.get('dtype'))}",
        f"{hw}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"sentence-transformers {env.get('sentence_transformers')}",
        f"Model: {report.get('model_source')}",
    ]
    if wl.get("real_tokens") is not None:
        lines.append(f"Work per timed call: {_fmt(wl.get('real_tokens'), ',.0f')} real tokens, "
                     f"{_fmt(wl.get('flops'), '.2f', scale=1e-12)} TFLOP")
    compute = report.get("compute") or {}
    if compute.get("floor_s"):
        lines.append(f"Compute floor: {compute['floor_s']:.4g} s per call at {compute['tflops']:.3g} TFLOP/s "
                     f"({compute.get('label')})")
    return lines


def _footer(report: dict) -> list[str]:
    setups = report.get("setups") or []
    kind = (report.get("workload") or {}).get("kind", "pairs")
    base = _baseline(report)
    lines = []
    if kind == "rerank":
        lines.append("Latency per query (one rank call over its documents), over every query; "
                     f"speedup is mean latency vs {base['name'] if base else 'the baseline'}.")
    elif setups:
        runs = (report.get("config") or {}).get("runs") or LAST_N
        primary = "unsorted" if any("unsorted" in s for s in setups) else "sorted"
        lines.append(f"Times: mean ± std (population) over the last {min(LAST_N, runs)} of {runs} runs. "
                     f"Speedup vs {base['name']}, pairs/s and x floor use {primary} inputs.")
    if any(s.get("host_s") is not None for s in setups):
        lines.append("host (s): tokenize + pack; forward (s): the model's forward (GPU kernel time on CUDA); "
                     "both of the last timed call. On a GPU the two overlap, so their sum can exceed the wall time.")
    if any(not s.get("complete", True) for s in setups):
        lines.append("* interrupted: fewer runs than planned.")
    if not report.get("complete", False):
        lines.append("INCOMPLETE: the run stopped before every setup finished.")
    lines += [f"Note: {n}" for n in report.get("notes") or []]
    return lines


def format_table(report: dict) -> str:
    """Plain-text table of every setup, with the original's sorted/unsorted columns."""
    cols = _columns(report)
    rows = [[h for h, _ in cols]] + [[cell(s) for _, cell in cols] for s in report.get("setups") or []]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    table = [fmt_row(rows[0]), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in rows[1:]]
    return "\n".join(_preamble(report) + [""] + table + [""] + _footer(report))


def format_markdown(report: dict) -> str:
    """The same table as GitHub markdown; works on a dict read back by load_json()."""
    esc = lambda c: c.replace("|", "\\|")
    cols = _columns(report)
    lines = ["| " + " | ".join(esc(h) for h, _ in cols) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(cols))) + " |"]
    lines += ["| " + " | ".join(esc(cell(s)) for _, cell in cols) + " |" for s in report.get("setups") or []]
    pre = _preamble(report)
    br = lambda ls: [l + "  " for l in ls]  # two trailing spaces: a markdown line break
    return "\n".join([f"**{pre[0]}**", ""] + br(pre[1:]) + [""] + lines + [""] + br(_footer(report)))


# ---------------------------------------------------------------- files


def _jsonable(x):
    """Plain JSON types: numpy/torch numbers and arrays become floats/lists, NaN becomes None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if torch.is_tensor(x):
        return _jsonable(x.detach().float().cpu().tolist() if x.is_floating_point() else x.cpu().tolist())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)  # torch.dtype, Path, ...


def write_json(report: dict, path: str | os.PathLike) -> str:
    """Write the report atomically (temp file + rename): a crash never leaves half a file.

    Call it after every setup; report["complete"] says whether the run finished.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(report), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a report is for everyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        report = json.load(f)
    if not isinstance(report, dict) or "setups" not in report:
        raise ValueError(f"{path}: not a benchmark report (no 'setups' key)")
    return report


def plot(report: dict, path: str | os.PathLike) -> str:
    """Bar chart of latency per setup (PNG), with the compute floor where known."""
    import matplotlib  # optional: only this function needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = report.get("setups") or []
    env, cfg = report.get("environment") or {}, report.get("config") or {}
    kind = (report.get("workload") or {}).get("kind", "pairs")
    floor = _num((report.get("compute") or {}).get("floor_s"))
    x = np.arange(len(setups))
    nan = float("nan")
    fig, ax = plt.subplots(figsize=(max(6.5, 2.0 * len(setups) + 2.5), 4.8))
    tops = np.zeros(len(setups))
    if kind == "rerank":
        ms = lambda key: np.array([(_num(s.get(key)) or nan) * 1e3 for s in setups])
        p50, p90, p99 = ms("p50_s"), ms("p90_s"), ms("p99_s")
        ax.bar(x, p50, width=0.55, color="tab:blue", label="p50")
        ax.scatter(x, p90, marker="_", s=900, linewidths=2.5, color="tab:orange", label="p90", zorder=3)
        ax.scatter(x, p99, marker="_", s=900, linewidths=2.5, color="tab:red", label="p99", zorder=3)
        tops = np.nanmax(np.vstack([p50, p90, p99, np.zeros(len(setups))]), axis=0)
        ax.set_ylabel("latency per query (ms)")
        floor = floor * 1e3 if floor else None
    else:
        orders = [o for o in ORDERS if any(o in s for s in setups)]
        width = 0.8 / max(len(orders), 1)
        for j, order in enumerate(orders):
            summ = [(s.get(order) or {}).get("summary") or {} for s in setups]
            mean = np.array([_num(m.get("mean")) or nan for m in summ])
            std = np.array([_num(m.get("std")) or 0.0 for m in summ])
            ax.bar(x + (j - (len(orders) - 1) / 2) * width, mean, width, yerr=std, capsize=4,
                   label=f"{order} inputs", color=("tab:blue", "tab:orange")[j])
            tops = np.fmax(tops, np.nan_to_num(mean + std))
        ax.set_ylabel(f"seconds per run of {_fmt((report.get('workload') or {}).get('pairs'), '.0f')} pairs")
    if floor:
        unit = "ms" if kind == "rerank" else "s"
        ax.axhline(floor, color="gray", linestyle="--", linewidth=1.2, label=f"compute floor ({floor:.3g} {unit})")
    for i, s in enumerate(setups):
        xf = _num(s.get("x_floor"))
        if xf is not None:
            ax.annotate(f"{xf:.3g}x floor", (x[i], tops[i]), xytext=(0, 6), textcoords="offset points",
                        ha="center", fontsize=9)
    ax.set_xticks(x, [textwrap.fill(str(s["name"]), 22) for s in setups], fontsize=9)
    ymax = max([float(t) for t in tops if np.isfinite(t)] + [floor or 0.0])
    ax.set_ylim(0, ymax * 1.18 if ymax > 0 else 1.0)  # headroom for the annotations
    # below the axes: inside, it hid the annotation of whichever bar was tallest
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    hw = env.get("gpu") or f"CPU ({env.get('cpu')})"
    source = str(report.get("model_source") or "")
    random_weights = "synthetic" in source or "random" in source
    title = f"{hw}, {env.get('dtype', cfg.get('dtype'))}, batch {cfg.get('batch_size')}"
    title += ", random weights" if random_weights else ""
    title += "" if report.get("complete", False) else " (incomplete)"
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print or plot a saved benchmark report (JSON).")
    parser.add_argument("--markdown", metavar="JSON", help="print the report's table as GitHub markdown")
    parser.add_argument("--table", metavar="JSON", help="print the report's table as plain text")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="draw the report's latency chart")
    args = parser.parse_args(argv)
    if not (args.markdown or args.table or args.plot):
        parser.error("give at least one of --markdown, --table, --plot")
    try:  # read every file first, so a bad path is an argparse error (exit 2), not a traceback
        reports = {p: load_json(p) for p in (args.table, args.markdown, args.plot and args.plot[0]) if p}
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        parser.error(str(e))
    if args.table:
        print(format_table(reports[args.table]))
    if args.markdown:
        print(format_markdown(reports[args.markdown]))
    if args.plot:
        print(plot(reports[args.plot[0]], args.plot[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
