"""GPU checks (skipped without CUDA): the varlen backends, bf16 accuracy against fp32, CUDA graphs.

bf16 tolerances come from what bf16 costs the model on the pairs compared, measured in the same run:
CrossEncoder's own bf16 scores against its fp32 ones (helpers.bf16_tolerance says why twice that, plus
one bf16 ulp), never a constant.

`-k preflight` selects the two checks gpu_check.sh runs first, in seconds: a compiled varlen call and
a CUDA-graph replay whose first output must survive the second. `-k "cuda_default and bf16"` is its
next step: the class's CUDA defaults (helpers.cuda_default_kwargs), on both paths, must replay CUDA
graphs (a profiler sees the launches) and score as eager does. The slowest checks come last: a step cut
short by its time limit keeps the ones before.
"""

import numpy as np
import pytest
import torch

import data
import packing
from dynamic_cross_encoder import DynamicCrossEncoder, compile_count, cudagraph_skips

from helpers import (IDENTITY, bf16_tolerance, cuda_api_calls, cuda_default_cases, cuda_default_kwargs,
                     cuda_default_problems, graph_replay_problems, reference_attention)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = [n for n, _ in packing.attention_backends("cuda", torch.bfloat16) if n in ("flash_attn", "varlen_attn")]


def _cross_encoder_logits(path, pairs, dtype, batch_size=16):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(path, device="cuda", model_kwargs={"dtype": dtype}, activation_fn=IDENTITY)
    return ce.predict(pairs, batch_size=batch_size)


def _bf16_tolerance(path, pairs, batch_size=16) -> float:
    """bf16_tolerance from CrossEncoder on `pairs`, this GPU."""
    return bf16_tolerance(*(_cross_encoder_logits(path, pairs, d, batch_size) for d in (torch.float32, torch.bfloat16)))


def _varlen_inputs(lengths, dtype=torch.bfloat16):
    torch.manual_seed(0)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    return [torch.randn(int(cu[-1]), 12, 64, device="cuda", dtype=dtype) for _ in range(3)], cu


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_varlen_backend_matches_per_sequence_sdpa(backend):
    (q, k, v), cu = _varlen_inputs([1, 7, 130, 0, 511, 64])
    got = packing.ATTENTION_BACKENDS[backend](q, k, v, cu, 512, 64**-0.5)
    ref = reference_attention(q.float(), k.float(), v.float(), cu, 64**-0.5)
    assert torch.isfinite(got).all()
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel  # bf16 operands: 1e-3..1e-2 relative


def test_preflight_compiled_varlen_call():
    (q, k, v), cu = _varlen_inputs([100, 28, 128])
    attention = packing.ATTENTION_BACKENDS[packing.choose_attention_backend("cuda", torch.bfloat16)[0]]
    fn = torch.compile(lambda q, k, v, cu: attention(q, k, v, cu, 256, 64**-0.5), dynamic=True)
    got = fn(q, k, v, cu)
    ref = reference_attention(q.float(), k.float(), v.float(), cu, 64**-0.5)
    assert (got.float() - ref).norm() / ref.norm() < 1e-2


def test_preflight_cuda_graph_replay_keeps_the_first_output(tiny_model_dir):
    bf16 = {"dtype": torch.bfloat16}  # the tiny twin is saved in fp32; the varlen kernels take bf16
    model = DynamicCrossEncoder(tiny_model_dir, device="cuda", compile_mode="reduce-overhead", packed=True,
                                max_tokens_per_batch=512, model_kwargs=bf16, activation_fn=IDENTITY)
    assert model.attention_backend in ("varlen_attn", "flash_attn") and model.uses_cuda_graphs
    # two batches of one shape (256 tokens, 3 sequences) with other values: the second replay
    # writes into the memory the first one returned. Pairs 2 apart on the twin (-0.67 and 1.42 in fp32,
    # 54 and 16 tokens), where bf16 moves them by < 0.01 on a CPU: an overwritten output is far outside
    # the bf16 tolerance.
    pairs = [["sit amet " * 20, "magna aliqua " * 5]] * 3 + [["consectetur adipiscing", "magna aliqua " * 5]] * 3
    model.warmup(batch_size=3)
    got = model.predict(pairs, batch_size=3)
    assert model.last_timings.batches == 2
    eager = DynamicCrossEncoder(tiny_model_dir, device="cuda", compile=False, packed=True, model_kwargs=bf16, activation_fn=IDENTITY)
    ref = eager.predict(pairs, batch_size=3)
    # below half the gap between the two batches' scores (or it raises): an overwritten first output fails
    tol = _bf16_tolerance(tiny_model_dir, pairs)
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    pairs = data.load_pairs(96, seed=3) + [["", ""], ["q", "lorem " * 700]]
    return pairs, *(_cross_encoder_logits(tiny_model_dir, pairs, dtype) for dtype in (torch.float32, torch.bfloat16))


def test_packed_fp32_matches_fp32_baseline_on_gpu(tiny_model_dir, references):
    pairs, fp32, _ = references
    model = DynamicCrossEncoder(tiny_model_dir, device="cuda", model_kwargs={"dtype": torch.float32}, packed=True,
                                compile=False, activation_fn=IDENTITY)
    assert model.attention_backend == "sdpa_nested"  # the varlen kernels take fp16/bf16 only
    got = model.predict(pairs, batch_size=16)
    # tf32 is off by default for matmuls in torch; fp32 differs by summation order only
    assert np.abs(got - fp32).max() < 1e-4


def test_full_size_packed_and_padded_agree_with_the_baseline():
    """The model of record's shapes (12 layers, head_dim 64): packed vs padded vs baseline, same inputs."""
    import models

    path = models.synthetic_dir("full")
    pairs = data.load_pairs(64, seed=9) + [["", ""]]
    ref = {dtype: _cross_encoder_logits(path, pairs, dtype, 32) for dtype in (torch.float32, torch.bfloat16)}
    tol = bf16_tolerance(ref[torch.float32], ref[torch.bfloat16])
    for packed in (False, True):
        # eager: the compiled paths are checked on the tiny twin below; this checks the numerics at
        # full size without two more minutes of compilation
        model = DynamicCrossEncoder(path, device="cuda", compile=False, packed=packed, activation_fn=IDENTITY)
        got = model.predict(pairs, batch_size=32)
        assert np.abs(got - ref[torch.float32]).max() <= tol, (packed, tol)


@pytest.mark.parametrize("packed,mode", [(False, "default"), (True, "default"), (False, "reduce-overhead"), (True, "reduce-overhead")])
def test_bf16_paths_stay_within_baseline_error(tiny_model_dir, references, packed, mode):
    pairs, fp32, bf16 = references
    model = DynamicCrossEncoder(tiny_model_dir, device="cuda", model_kwargs={"dtype": torch.bfloat16}, packed=packed,
                                compile_mode=mode, max_tokens_per_batch=2048, activation_fn=IDENTITY)
    model.warmup(pairs, batch_size=16)
    before = compile_count()
    got = model.predict(pairs, batch_size=16)
    again = model.predict(pairs[::-1], batch_size=16)[::-1]  # CUDA graphs: replays must not overwrite kept outputs
    assert compile_count() == before and model.last_timings.new_shapes == []
    tol = bf16_tolerance(fp32, bf16)
    assert np.abs(got - fp32).max() <= tol
    # Reversed input reorders ties in length, so batches hold other pairs and cuBLAS may pick other
    # kernels: in bf16 that moves a logit by the paths' own rounding, not by the logit spread that an
    # overwritten output would show.
    assert np.abs(again - got).max() <= tol


@pytest.mark.parametrize("packed,dtype", [pytest.param(p, d, id=i) for p, d, i in cuda_default_cases()])
def test_cuda_default_configuration_replays_cuda_graphs(tiny_model_dir, packed, dtype):
    """The class's CUDA defaults (max-autotune, CUDA graphs; padded x16 buckets, and packed with the default
    backend: varlen in bf16, nested SDPA in fp32): a warmed call replays a graph per batch and records none,
    inductor skips no graph, and the scores are eager's."""
    kwargs = cuda_default_kwargs(packed, dtype)
    model = DynamicCrossEncoder(tiny_model_dir, **kwargs)  # first: tests/test_gpu_checks.py checks these kwargs
    assert model.uses_cuda_graphs and model.packed is packed, model.describe()
    pairs = data.load_pairs(40, seed=11) + [["", ""]]
    before = cudagraph_skips()
    model.warmup(batch_size=8)
    got = model.predict(pairs, batch_size=8)

    def profiled():  # on the model's own thread: a profiler sees the CUDA calls of its thread
        with cuda_api_calls() as names:
            out = model.predict(pairs, batch_size=8)  # replays only: a kept output overwritten would show here
        return out, names

    again, names = model._on_owner(profiled)
    assert model.last_timings.new_shapes == []
    ref = DynamicCrossEncoder(tiny_model_dir, **{**kwargs, "compile": False}).predict(pairs, batch_size=8)
    # bf16: each path's own rounding (bf16_tolerance); fp32: summation order only (tf32 is off by default)
    tol = _bf16_tolerance(tiny_model_dir, pairs, 8) if dtype == torch.bfloat16 else 1e-4
    problems = cuda_default_problems(before, got, ref, tol) + cuda_default_problems(before, again, ref, tol)
    assert problems + graph_replay_problems(names, model.last_timings.batches) == []
