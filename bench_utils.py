"""The measurement harness of the cross-encoder benchmarks: timing, statistics, FLOPs and the GEMM
floor, the environment, score agreement. It returns typed records (dataclasses); report.py turns
them into tables, JSON and plots, and benchmark.py is the procedure that calls both.

The timing protocol is the original one: untimed warm-up calls, then one timed call per workload
(fresh inputs per run: the caller seeds each workload differently), `torch.cuda.synchronize()`
before and after each call, mean +- std over the last 5 runs.

This module takes callables and numbers; of the project it imports packing.py's probes, compiled.py's timing event.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from compiled import timing_event
from packing import flash_attn_available, is_cuda  # is_cuda: the one "is this CUDA" test of the bench code

LAST_N = 5  # the original reported mean +- std over the last 5 of 10 runs
WORKLOADS = ("pairs", "rerank")
# Field metadata for report.py's JSON writer: a value kept in memory, never written to a file.
NOT_SAVED = {"json": "skip"}


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ---------------------------------------------------------------- timing


def sync(device) -> None:
    """Wait for queued GPU work; without this a timer measures kernel launches only."""
    if is_cuda(device):
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


@dataclass
class Summary:
    """Statistics over the last `n` of a run's `n_total` times; all_times keeps every run."""

    mean: float
    std: float  # population std (ddof=0), as the original's np.std
    median: float
    min: float
    max: float
    n: int
    n_total: int
    all_times: list[float]


def summarize(times: Sequence[float], last: int = LAST_N) -> Summary:
    """Statistics over the last `last` times (all of them if fewer); median/min/max over the same
    window, so one row describes one set of runs."""
    if len(times) == 0:
        raise ValueError("summarize() needs at least one time")
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    window = np.asarray(times[-last:], dtype=np.float64)
    return Summary(mean=float(window.mean()), std=float(window.std()), median=float(np.median(window)),
                   min=float(window.min()), max=float(window.max()), n=int(window.size), n_total=len(times),
                   all_times=[float(t) for t in times])


@dataclass
class RunResult:
    """One setup on one list of workloads: warm-up, then one timed call per workload."""

    name: str
    times: list[float] = field(default_factory=list)
    summary: Summary | None = None  # None when no timed call finished
    warmup_s: float = 0.0
    warmup_calls: int = 0
    runs_planned: int = 0
    complete: bool = False  # False when Ctrl-C stopped it
    # fn's return values (keep_outputs=True): scores are compared in the run, not kept in files
    outputs: list = field(default_factory=list, repr=False, compare=False, metadata=NOT_SAVED)


def run_timed(name: str, fn: Callable[[Any], Any], workloads: Sequence[Any], *, device,
              warmup_calls: int, progress: bool = True, warmup_workloads: Sequence[Any] | None = None,
              keep_outputs: bool = False) -> RunResult:
    """Warm up, then time one `fn(workload)` call per workload, in order.

    Warm-up calls cycle through `warmup_workloads` (default: `workloads`); their total wall time is
    `warmup_s` and is never part of `times`. Ctrl-C stops the loop: the finished runs are kept and
    `complete` is False, so the caller can still write its report.
    """
    warm = list(warmup_workloads) if warmup_workloads is not None else list(workloads)
    if warmup_calls > 0 and not warm:
        raise ValueError("warm-up needs at least one workload")
    show = progress and sys.stderr.isatty()
    result = RunResult(name, runs_planned=len(workloads))
    bar = None
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=warmup_calls, desc=f"{name} warm-up", disable=not show, leave=False)
        for i in range(warmup_calls):
            fn(warm[i % len(warm)])
            result.warmup_calls += 1
            bar.update(1)
        sync(device)
        result.warmup_s = time.perf_counter() - t0
        t0 = None  # warm-up done
        bar.close()
        bar = tqdm(total=len(workloads), desc=name, disable=not show, leave=False)
        for workload in workloads:
            seconds, out = _timed(lambda: fn(workload), device)
            result.times.append(seconds)
            if keep_outputs:
                result.outputs.append(out)
            bar.update(1)
        result.complete = True
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted, keeping {len(result.times)} of {len(workloads)} timed runs", file=sys.stderr)
        if t0 is not None:  # interrupted during warm-up
            result.warmup_s = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    if result.times:
        result.summary = summarize(result.times)
    return result


# ---------------------------------------------------------------- efficiency and FLOPs


def throughput(pairs: float, real_tokens: float, seconds: float) -> tuple[float, float]:
    """-> (pairs/s, real tokens/s)."""
    return pairs / seconds, real_tokens / seconds


def padding_efficiency(real_tokens: int, padded_tokens: int) -> float:
    """Fraction of the tokens the model processed that were real (1.0 = no padding)."""
    return real_tokens / padded_tokens


def flops_per_sequence(length: int, *, hidden: int = 768, intermediate: int = 3072, layers: int = 12) -> float:
    """Forward FLOPs of one encoder pass over `length` tokens.

    Per layer: dense 2*L*(4h^2 + 2h*i) (q, k, v, out projections and the two MLP matrices, 2 FLOPs
    per multiply-add) plus attention 4*L^2*h (QK^T and PV). Embeddings and the classifier head are
    left out (negligible).
    """
    per_layer = 2 * length * (4 * hidden**2 + 2 * hidden * intermediate) + 4 * length**2 * hidden
    return float(layers * per_layer)


def workload_flops(lengths: Sequence[int], **dims) -> float:
    """Sum of flops_per_sequence over sequences of the given token lengths (no padding)."""
    return float(sum(flops_per_sequence(int(n), **dims) for n in lengths))


@dataclass
class Workload:
    """What one timed call processes, as means over the timed calls."""

    kind: str  # "pairs" | "rerank"
    calls: int  # timed calls (runs for pairs, queries for rerank)
    pairs: float  # pairs per call (documents per query for rerank)
    real_tokens: float  # tokens per call after truncation, no padding
    mean_tokens_per_pair: float
    max_tokens_per_pair: int
    flops: float  # per call, flops_per_sequence summed over its pairs


def workload_summary(kind: str, lengths_per_call: Sequence[Sequence[int]], **dims) -> Workload:
    """lengths_per_call: one list of per-pair token lengths (after truncation) per timed call."""
    if kind not in WORKLOADS:
        raise ValueError(f"kind must be one of {', '.join(WORKLOADS)}, got {kind!r}")
    if not lengths_per_call or not all(len(ls) for ls in lengths_per_call):
        raise ValueError("lengths_per_call needs at least one non-empty list")
    all_lengths = [int(n) for ls in lengths_per_call for n in ls]
    calls = len(lengths_per_call)
    return Workload(kind=kind, calls=calls, pairs=len(all_lengths) / calls, real_tokens=sum(all_lengths) / calls,
                    mean_tokens_per_pair=sum(all_lengths) / len(all_lengths), max_tokens_per_pair=max(all_lengths),
                    flops=sum(workload_flops(ls, **dims) for ls in lengths_per_call) / calls)


# ---------------------------------------------------------------- GEMM rate and compute floor


@dataclass
class GemmShape:
    m: int
    k: int
    n: int
    flops: float
    seconds: float  # per matmul
    tflops: float


@dataclass
class GemmMeasurement:
    device: str  # "cuda" | "cpu"
    dtype: str
    iters: int
    shapes: list[GemmShape]
    tflops: float  # total FLOPs / total time over the shapes
    label: str


@dataclass
class Compute:
    """The compute floor of one timed call: its FLOPs at the measured GEMM rate."""

    gemm: GemmMeasurement
    tflops: float
    flops: float
    floor_s: float
    label: str


def model_gemm_shapes(tokens: int, hidden: int = 768, intermediate: int = 3072) -> list[tuple[int, int, int]]:
    """The model's GEMMs for T tokens as (M, K, N): fused qkv, attention out, MLP up, MLP down."""
    return [(tokens, hidden, 3 * hidden), (tokens, hidden, hidden),
            (tokens, hidden, intermediate), (tokens, intermediate, hidden)]


def _time_matmul(a: torch.Tensor, b: torch.Tensor, iters: int) -> float:
    """Seconds per `a @ b`, averaged over `iters` back-to-back calls after 3 untimed ones."""
    for _ in range(3):  # cuBLAS picks its kernel and the clocks ramp up
        a @ b
    if not is_cuda(a.device):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        return (time.perf_counter() - t0) / iters
    # events on a's device's stream (cuda:N need not be the current device): host timing would add launch gaps
    torch.cuda.synchronize(a.device)
    start = timing_event(a.device)
    for _ in range(iters):
        a @ b
    end = timing_event(a.device)
    torch.cuda.synchronize(a.device)
    return start.elapsed_time(end) / 1e3 / iters


def native_cpu_dtype() -> torch.dtype:
    """The CPU's own reduced precision where it has one (bf16 with AVX-512 BF16 or AMX), else fp32."""
    from device_policy import cpu_capabilities, cpu_dtype

    return cpu_dtype(cpu_capabilities())[0]


def measure_gemm_tflops(device, dtype: torch.dtype = torch.bfloat16, shapes=None,
                        iters: int | None = None) -> GemmMeasurement:
    """Matmul throughput at this model's shapes, measured in this process.

    CUDA: the given dtype, T=16384 tokens, 50 iterations. CPU: the given dtype where the CPU computes
    it natively, else fp32; T=1024, 3 iterations (~1 s); labelled as indicative only, no GPU floor.
    """
    cuda = is_cuda(device)
    if not cuda and dtype != native_cpu_dtype():
        dtype = torch.float32  # emulated CPU half precision says nothing useful
    # CPU: at T=256 the GEMMs ran at half their rate at T=1024 (35 vs 68 GFLOP/s on 2 cores), which
    # put the setups "under the floor"; T=1024 is the steady rate and takes ~1 s.
    shapes = shapes or model_gemm_shapes(16384 if cuda else 1024)
    iters = iters or (50 if cuda else 3)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        seconds = _time_matmul(a, b, iters)
        flops = 2.0 * m * k * n
        rows.append(GemmShape(m, k, n, flops, seconds, flops / seconds / 1e12))
    tflops = sum(r.flops for r in rows) / sum(r.seconds for r in rows) / 1e12
    dname = str(dtype).removeprefix("torch.")
    if cuda:
        label = f"measured {dname} GEMM at model shapes on {torch.cuda.get_device_name(device)}"
    else:
        label = f"CPU {dname} GEMM at T={shapes[0][0]} (indicative only, not a GPU floor)"
    return GemmMeasurement("cuda" if cuda else "cpu", dname, iters, rows, tflops, label)


def floor_seconds(flops: float, tflops: float) -> float:
    """Time the FLOPs take at the measured GEMM rate: no run can be faster."""
    return flops / (tflops * 1e12)


def compute_floor(flops: float, gemm: GemmMeasurement) -> Compute:
    return Compute(gemm=gemm, tflops=gemm.tflops, flops=flops, floor_s=floor_seconds(flops, gemm.tflops),
                   label=gemm.label)


# ---------------------------------------------------------------- environment and memory


@dataclass
class Environment:
    """Hardware and versions; nothing that names the machine or the user. None where unknown."""

    device: str | None = None
    dtype: str | None = None
    gpu: str | None = None  # None on CPU
    gpu_memory_bytes: int | None = None
    cpu: str | None = None
    cpu_count: int | None = None
    platform: str | None = None
    python: str | None = None
    torch: str | None = None
    cuda: str | None = None
    transformers: str | None = None
    sentence_transformers: str | None = None
    tokenizers: str | None = None
    numpy: str | None = None
    triton: str | None = None
    flash_attn: str | None = None  # the installed version
    flash_attn_installed: bool | None = None
    timestamp_utc: str | None = None


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


def environment(device, dtype: torch.dtype) -> Environment:
    cuda = is_cuda(device)
    return Environment(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        gpu=torch.cuda.get_device_name(device) if cuda else None,
        gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory if cuda else None,
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=_version("transformers"),
        sentence_transformers=_version("sentence-transformers"),
        tokenizers=_version("tokenizers"),
        numpy=np.__version__,
        triton=_version("triton"),
        flash_attn=_version("flash-attn"),
        flash_attn_installed=flash_attn_available(),
        timestamp_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def reset_peak_memory(device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> int | None:
    """Bytes of GPU memory allocated at the peak since reset_peak_memory(); None on CPU."""
    return torch.cuda.max_memory_allocated(device) if is_cuda(device) else None


# ---------------------------------------------------------------- latency and agreement


def percentiles(times: Sequence[float]) -> dict[str, float]:
    """{"p50", "p90", "p99"} of per-call latencies (seconds), numpy's linear interpolation."""
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


@dataclass
class ScoreDiff:
    max_abs: float
    mean_abs: float


def score_diff(a, b) -> ScoreDiff:
    """max and mean |a - b| between two score lists for the same pairs, same order."""
    a, b = _vectors(a, b)
    diff = np.abs(a - b)
    return ScoreDiff(max_abs=float(diff.max()), mean_abs=float(diff.mean()))


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


@dataclass
class RankingAgreement:
    kendall_tau: float  # mean over queries; NaN when no query has a ranking
    top_k_overlap: float  # mean over queries
    k: int


def ranking_agreement(scores_a: Sequence, scores_b: Sequence, k: int = 10) -> RankingAgreement:
    """Mean Kendall tau and top-k overlap over queries (lists of per-query score lists)."""
    taus = [kendall_tau(a, b) for a, b in zip(scores_a, scores_b, strict=True)]
    tops = [top_k_overlap(a, b, k) for a, b in zip(scores_a, scores_b, strict=True)]
    tau = float(np.nanmean(taus)) if not all(math.isnan(t) for t in taus) else float("nan")
    return RankingAgreement(kendall_tau=tau, top_k_overlap=float(np.mean(tops)), k=k)


# ---------------------------------------------------------------- host ceiling


@dataclass
class HostCeiling:
    """How fast the host alone can go on the timed pairs, so a reader sees whether a run was host-bound."""

    tokenizer_pairs_per_s: float  # the `tokenizers` backend alone: parallel encode, longest_first, no padding
    host_pairs_per_s: float | None  # predict with the forward skipped (DynamicCrossEncoder.host_seconds)


def raw_tokenizer(tokenizer, max_length: int) -> Callable[[Sequence], Any]:
    """The tokenizer's own speed for pairs: a copy of its `tokenizers` backend set to longest_first
    truncation at max_length and no padding, called through its parallel encode_batch_fast."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length, strategy="longest_first")
    return lambda pairs: backend.encode_batch_fast([(a, b) for a, b in pairs])


def host_ceiling(workloads: Sequence[Sequence], tokenizer, max_length: int, *, model=None,
                 batch_size: int = 32) -> HostCeiling:
    """Pairs/s of the raw tokenizer and (with a DynamicCrossEncoder `model`) of its host pipeline,
    interleaved workload by workload so both see the same machine state."""
    encode = raw_tokenizer(tokenizer, max_length)
    pairs = tok_s = host_s = 0.0
    for workload in workloads:
        pairs += len(workload)
        tok_s += time_call(lambda w=workload: encode(w), "cpu")
        if model is not None:
            host_s += model.host_seconds(workload, batch_size=batch_size)
    return HostCeiling(pairs / tok_s, pairs / host_s if model is not None else None)

