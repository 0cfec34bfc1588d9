"""GPU checks (skipped without CUDA): the varlen backends, bf16 accuracy against fp32, CUDA graphs.

Tolerances are relative to what the baseline itself achieves: bf16 rounding moves each score by
up to ~1e-2 of the logit scale, so an optimized bf16 path must stay within 2x the baseline's own
bf16 error against the fp32 reference (plus 1e-3 for summation order), never a fixed loose bound.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import dynamic_cross_encoder as dce

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference_attention(q, k, v, cu):
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            out[a:b] = F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", [b for b in ("flash_attn", "varlen_attn") if torch.cuda.is_available() and b in dce.available_attention_backends(torch.device("cuda"))])
def test_varlen_backend_matches_per_sequence_sdpa(backend):
    torch.manual_seed(0)
    lengths = [1, 7, 130, 0, 511, 64]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(int(cu[-1]), 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = dce.ATTENTION_BACKENDS[backend](q, k, v, cu, 512, 64**-0.5)
    ref = _reference_attention(q.float(), k.float(), v.float(), cu)
    assert torch.isfinite(got).all()
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel  # bf16 operands: 1e-3..1e-2 relative


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    from sentence_transformers import CrossEncoder

    pairs = data.load_pairs(96, seed=3) + [["", ""], ["q", "lorem " * 700]]
    ident = torch.nn.Identity()
    fp32 = CrossEncoder(tiny_model_dir, device="cuda", model_kwargs={"dtype": torch.float32}, activation_fn=ident).predict(pairs, batch_size=16)
    bf16 = CrossEncoder(tiny_model_dir, device="cuda", model_kwargs={"dtype": torch.bfloat16}, activation_fn=ident).predict(pairs, batch_size=16)
    return pairs, fp32, bf16


@pytest.mark.parametrize("packed,mode", [(False, "default"), (True, "default"), (False, "reduce-overhead"), (True, "reduce-overhead")])
def test_bf16_paths_stay_within_baseline_error(tiny_model_dir, references, packed, mode):
    pairs, fp32, bf16 = references
    model = dce.DynamicCrossEncoder(tiny_model_dir, device="cuda", model_kwargs={"dtype": torch.bfloat16}, packed=packed, compile_mode=mode, max_tokens_per_batch=2048, activation_fn=torch.nn.Identity())
    model.warmup(pairs, batch_size=16)
    before = dce.compile_count()
    got = model.predict(pairs, batch_size=16)
    again = model.predict(pairs[::-1], batch_size=16)[::-1]  # CUDA graphs: replays must not overwrite kept outputs
    assert dce.compile_count() == before
    baseline_err = np.abs(bf16 - fp32).max()
    assert np.abs(got - fp32).max() <= 2 * baseline_err + 1e-3
    np.testing.assert_allclose(again, got, atol=1e-6)


def test_packed_fp32_matches_fp32_baseline_on_gpu(tiny_model_dir, references):
    pairs, fp32, _ = references
    model = dce.DynamicCrossEncoder(tiny_model_dir, device="cuda", model_kwargs={"dtype": torch.float32}, packed=True, compile=False, activation_fn=torch.nn.Identity())
    got = model.predict(pairs, batch_size=16)
    # tf32 is off by default for matmuls in torch; fp32 differs by summation order only
    assert np.abs(got - fp32).max() < 1e-4
