"""Inputs and comparisons shared by the DynamicCrossEncoder tests, and the checks tests/test_gpu.py makes
(pure functions, so tests/test_gpu_checks.py tests them on the CPU)."""

import contextlib

import numpy as np
import torch

import data
from device_policy import device_defaults

IDENTITY = torch.nn.Identity()  # compare logits: sigmoid would squash differences
# The reference dtype, asked for by name: on a CPU with native bf16 the default dtype is bf16
# (device_policy.py), which the exact comparisons below are not about.
FP32 = {"dtype": torch.float32}
TOL = 1e-5  # fp32, same weights: only summation order differs (~1e-6 seen)
LONG_TEXT = " ".join(data.SENTENCES[:120])  # ~1300 tokens: truncated at any max_length here

# Mixed on purpose: empty texts, one word, truncated at max_length from either side, duplicates.
EDGE_PAIRS = [
    ["", ""],
    ["lorem", ""],
    ["", "ipsum"],
    ["lorem", "ipsum"],
    [LONG_TEXT, "dolor sit amet"],
    ["dolor sit amet", LONG_TEXT],
    [LONG_TEXT, LONG_TEXT[::-1]],
    ["lorem", "ipsum"],
]


def workload(n: int = 40, seed: int = 0) -> list[list[str]]:
    return data.load_pairs(n, seed=seed, min_sentences=1, max_sentences=12) + EDGE_PAIRS


def assert_same_logits(out, ref, tol: float = TOL, what: str = "logits"):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape
    # Without spread in the reference, a 1e-5 tolerance would pass a model that ignores its input.
    assert ref.std() > 1e-3, f"reference logits barely vary (std {ref.std():.2e}); the comparison proves nothing"
    diff = np.abs(out - ref).max()
    assert diff <= tol, f"{what}: max |logit diff| {diff:.2e} > {tol:.0e}"


def reference_attention(q, k, v, cu, scale=None):
    """(tokens, heads, dim) -> same: each [cu[i], cu[i+1]) segment attends only to itself, plain
    SDPA per segment; rows outside every segment stay zero."""
    import torch.nn.functional as F

    out = torch.zeros_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            seg = [x[a:b].transpose(0, 1) for x in (q, k, v)]  # (heads, len, dim)
            out[a:b] = F.scaled_dot_product_attention(*seg, scale=scale).transpose(0, 1)
    return out


def spy_logits(model, monkeypatch, before=None):
    """Wrap the model's compiled forward: `before(*args)` runs first (it may raise, e.g. an emulated
    out-of-memory); returns the list of argument tuples of the calls that went through."""
    original, calls = model._logits, []

    def spy(*args):
        if before is not None:
            before(*args)
        calls.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        return original(*args)

    monkeypatch.setattr(model, "_logits", spy)
    return calls


def cuda_default_problems(skips_before: int, got, ref, tol: float) -> list[str]:
    """What is wrong with a run that must replay CUDA graphs: inductor skipped graphs since
    `skips_before` (dynamo's counter, see dynamic_cross_encoder.cudagraph_skips), or the scores moved
    from the eager reference by more than `tol`. Empty when the run is sound."""
    from dynamic_cross_encoder import cudagraph_skips

    problems = []
    if (skips := cudagraph_skips() - skips_before) > 0:
        problems.append(f"inductor skipped CUDA graphs {skips} time(s)")
    diff = float(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).max())
    if not diff <= tol:  # NaN fails too
        problems.append(f"scores moved from eager: max |diff| {diff:.1e} > {tol:.1e}")
    return problems


# ---- what tests/test_gpu.py checks on a GPU ------------------------------------------------------


def bf16_tolerance(fp32, bf16) -> float:
    """Largest max |score diff| allowed between two bf16 runs of one model on the same pairs, or between a
    bf16 run and fp32: derived from what bf16 costs this model on these pairs, measured by the reference
    (`bf16`, `fp32`: CrossEncoder's own scores in each dtype, same pairs, same device).

    Every bf16 path rounds differently (kernel choice, fusion, accumulation order), each about as much as
    the reference does, so two of them may differ by twice its error (|a - b| <= |a - fp32| + |b - fp32|).
    Plus one bf16 ulp at the largest score (bf16 keeps 8 significant bits: values in [2^e, 2^(e+1)) are
    2^(e-7) apart), the floor: two paths equal to the last bit before their final rounding can still land
    on neighbouring bf16 values, however small the measured error. A constant cannot serve: bf16 moved the
    tiny twin's logits by 3-3.7e-2 of a 0.75 spread, a full-size twin's by 5-33% of its spread (twins.py).

    Raises unless the tolerance is below half the reference's spread: above it, scores reversed or all
    equal to their mean (an overwritten CUDA-graph output, a head reading the wrong row) would pass."""
    fp32, bf16 = np.asarray(fp32, dtype=np.float64), np.asarray(bf16, dtype=np.float64)
    measured = float(np.abs(bf16 - fp32).max())
    top = float(np.abs(fp32).max())
    ulp = 2.0 ** (np.floor(np.log2(top)) - 7) if top > 0 else 0.0
    tol = 2 * measured + ulp
    spread = float(fp32.max() - fp32.min())
    if not tol < spread / 2:  # NaN fails too
        raise AssertionError(f"bf16 tolerance {tol:.1e} (2 x measured {measured:.1e} + ulp {ulp:.1e}) is not below half "
                             f"the reference's spread {spread:.1e}: a wrong result would pass; use pairs that score apart")
    return tol


GRAPH_LAUNCH = ("cudaGraphLaunch", "cuGraphLaunch")  # CUPTI's names for a graph replay (runtime, driver API)
GRAPH_CAPTURE = ("cudaStreamBeginCapture", "cuStreamBeginCapture")  # a recording


def graph_replay_problems(names, batches: int) -> list[str]:
    """What is wrong with a warmed call that must replay CUDA graphs, from the names of the events a profiler
    recorded around it (`cuda_api_calls`) and the batches the call ran: fewer graph launches than batches
    (inductor's graph partitioning splits a graph around CPU ops and device copies without counting a
    cudagraph skip, so only launches prove replays), or a graph recorded inside the call. Empty when sound."""
    names = list(names)
    launches = sum(n.startswith(GRAPH_LAUNCH) for n in names)
    captures = sum(n.startswith(GRAPH_CAPTURE) for n in names)
    problems = []
    if batches < 1:
        problems.append("the call ran no batch: nothing to replay")
    if not any(n.startswith("cu") for n in names):
        problems.append("the profiler recorded no CUDA API call: no evidence either way (is CUPTI available?)")
    elif launches < batches:
        problems.append(f"{launches} CUDA-graph launch(es) for {batches} batch(es): not every batch replayed a graph")
    if captures:
        problems.append(f"{captures} CUDA-graph capture(s) inside a warmed call")
    return problems


@contextlib.contextmanager
def cuda_api_calls():
    """Yields a list that, when the block ends, holds the names of the events a torch profiler recorded in it:
    operators of this thread, and with CUDA the runtime calls CUPTI traces (cudaLaunchKernel, cudaGraphLaunch,
    cudaStreamBeginCapture). Run it on the thread that calls the model (DynamicCrossEncoder._on_owner): a
    profiler sees the operators of its own thread only (pytorch/kineto issue 443)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [a for a in (ProfilerActivity.CPU, ProfilerActivity.CUDA) if a in torch.profiler.supported_activities()]
    names = []
    with profile(activities=activities) as prof:
        yield names
    names.extend(event.name for event in prof.events())


# Sizes of the GPU check, not the policy: fewer shapes to record in a short warm-up (16 widths up to 256
# tokens padded, 4 token buckets packed) than the defaults' 64 and 64.
CUDA_CHECK_SIZES = {"max_length": 256, "max_tokens_per_batch": 1024}


def cuda_default_kwargs(packed: bool, dtype: torch.dtype) -> dict:
    """DynamicCrossEncoder arguments of the GPU check of the class's CUDA default: every setting that
    device_defaults("cuda") decides, written out from it, except the path (`packed`: both are checked) and
    the dtype (the default is the checkpoint's: fp32 for the tiny twin, bf16 for the model of record), with
    CUDA_CHECK_SIZES and logits compared raw."""
    defaults = device_defaults("cuda")
    return dict(device="cuda", compile=True, compile_mode=defaults["compile_mode"], packed=packed,
                model_kwargs={"dtype": dtype}, activation_fn=IDENTITY, **CUDA_CHECK_SIZES)


def cuda_default_cases() -> list[tuple[bool, torch.dtype, str]]:
    """(packed, dtype, id) of each run of the CUDA-default check: the default path first, then the other one,
    in bf16 (the model of record's dtype) then fp32. gpu_check.sh's cuda-default step selects the bf16 ones."""
    default = device_defaults("cuda")["packed"]
    paths = [(default, ("packed" if default else "padded") + "-default"), (not default, "packed" if not default else "padded")]
    return [(packed, dtype, f"{name}-{tag}") for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"))
            for packed, name in paths]
