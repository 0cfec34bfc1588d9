"""Inputs and comparisons shared by the DynamicCrossEncoder tests."""

import numpy as np
import torch

import data

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
