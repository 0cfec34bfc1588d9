"""GPU checks (skipped without CUDA): the varlen backends, bf16 accuracy against fp32, CUDA graphs.

Tolerances are relative to what the baseline itself achieves: bf16 rounding moves each logit by a
fraction of the logit scale, so an optimized bf16 path must stay within 2x the baseline's own bf16
error against the fp32 reference (plus 1e-3 for summation order), never a fixed loose bound.

`-k preflight` selects the two checks gpu_check.sh runs first, in seconds: a compiled varlen call and
a CUDA-graph replay whose first output must survive the second. `-k "cuda_default and bf16"` is its
next step: the class's CUDA default configuration, which must really replay CUDA graphs.
"""

import numpy as np
import pytest
import torch

import data
import packing
from dynamic_cross_encoder import DynamicCrossEncoder, compile_count, cudagraph_skips

from helpers import IDENTITY, cuda_default_problems, reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = [n for n, _ in packing.attention_backends("cuda", torch.bfloat16) if n in ("flash_attn", "varlen_attn")]


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
    # writes into the memory the first one returned
    pairs = [["sit amet " * 20, "consectetur"]] * 3 + [["lorem ipsum", "dolor"]] * 3
    model.warmup(batch_size=3)
    got = model.predict(pairs, batch_size=3)
    assert model.last_timings.batches == 2
    eager = DynamicCrossEncoder(tiny_model_dir, device="cuda", compile=False, packed=True, model_kwargs=bf16, activation_fn=IDENTITY)
    ref = eager.predict(pairs, batch_size=3)
    assert abs(ref[0] - ref[-1]) > 0.1, "the two batches must score differently for this check to mean anything"
    np.testing.assert_allclose(got, ref, atol=2e-2)  # bf16, same weights: rounding only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_default_configuration_replays_cuda_graphs(tiny_model_dir, dtype):
    """The class's CUDA defaults (max-autotune, CUDA graphs, packed with the default backend: varlen in
    bf16, nested SDPA in fp32): inductor must not skip graphs, and the scores must be eager's."""
    kwargs = dict(device="cuda", packed=True, model_kwargs={"dtype": dtype}, activation_fn=IDENTITY,
                  max_tokens_per_batch=1024)  # 4 token buckets instead of 64: a short warm-up
    model = DynamicCrossEncoder(tiny_model_dir, **kwargs)
    assert model.compile_mode == "max-autotune" and model.uses_cuda_graphs, model.describe()
    pairs = data.load_pairs(40, seed=11) + [["", ""]]
    before = cudagraph_skips()
    model.warmup(batch_size=8)
    got = model.predict(pairs, batch_size=8)
    again = model.predict(pairs, batch_size=8)  # replays only: a kept output overwritten would show here
    assert model.last_timings.new_shapes == []
    ref = DynamicCrossEncoder(tiny_model_dir, compile=False, **kwargs).predict(pairs, batch_size=8)
    # bf16, same weights: kernel choice and rounding only (as the preflight); fp32: summation order
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert cuda_default_problems(before, got, ref, tol) + cuda_default_problems(before, again, ref, tol) == []


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    from sentence_transformers import CrossEncoder

    pairs = data.load_pairs(96, seed=3) + [["", ""], ["q", "lorem " * 700]]
    fp32 = CrossEncoder(tiny_model_dir, device="cuda", model_kwargs={"dtype": torch.float32}, activation_fn=IDENTITY).predict(pairs, batch_size=16)
    bf16 = CrossEncoder(tiny_model_dir, device="cuda", model_kwargs={"dtype": torch.bfloat16}, activation_fn=IDENTITY).predict(pairs, batch_size=16)
    return pairs, fp32, bf16


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
    baseline_err = np.abs(bf16 - fp32).max()
    assert np.abs(got - fp32).max() <= 2 * baseline_err + 1e-3
    # Reversed input reorders ties in length, so batches hold other pairs and cuBLAS may pick other
    # kernels: in bf16 that moves a logit by up to the path's own rounding error, not by the logit
    # spread that an overwritten output would show.
    assert np.abs(again - got).max() <= baseline_err + 1e-3


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
    from sentence_transformers import CrossEncoder

    path = models.synthetic_dir("full")
    pairs = data.load_pairs(64, seed=9) + [["", ""]]
    ref = {dtype: CrossEncoder(path, device="cuda", model_kwargs={"dtype": dtype}, activation_fn=IDENTITY).predict(pairs, batch_size=32)
           for dtype in (torch.float32, torch.bfloat16)}
    baseline_err = np.abs(ref[torch.bfloat16] - ref[torch.float32]).max()
    for packed in (False, True):
        # eager: the compiled paths are checked on the tiny twin above; this checks the numerics at
        # full size without two more minutes of compilation
        model = DynamicCrossEncoder(path, device="cuda", compile=False, packed=packed, activation_fn=IDENTITY)
        got = model.predict(pairs, batch_size=32)
        assert np.abs(got - ref[torch.float32]).max() <= 2 * baseline_err + 1e-3, (packed, baseline_err)
