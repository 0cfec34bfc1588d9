"""device_policy.py: the CPU dtype policy as a pure function of the CPU's capabilities, the inductor
options and threads it picks, and what DynamicCrossEncoder does with them (bf16 near fp32, fp32 exact)."""

import numpy as np
import pytest
import torch

import data
import device_policy as dp
from device_policy import CpuCapabilities, cpu_dtype
from dynamic_cross_encoder import DynamicCrossEncoder

from helpers import FP32, IDENTITY, assert_same_logits, workload

SAPPHIRE_RAPIDS = CpuCapabilities(isa="AVX512", avx512_bf16=True, amx=True)
COOPER_LAKE_OR_ZEN4 = CpuCapabilities(isa="AVX512", avx512_bf16=True, amx=False)
SKYLAKE_X = CpuCapabilities(isa="AVX512", avx512_bf16=False, amx=False)
HASWELL = CpuCapabilities(isa="AVX2", avx512_bf16=False, amx=False)


@pytest.mark.parametrize("caps, dtype, reason", [
    (SAPPHIRE_RAPIDS, torch.bfloat16, "CPU has AMX"),
    (COOPER_LAKE_OR_ZEN4, torch.bfloat16, "CPU has avx512_bf16"),
    (SKYLAKE_X, torch.float32, "CPU has no native bf16 (AVX512): bf16 would be emulated"),
    (HASWELL, torch.float32, "CPU has no native bf16 (AVX2): bf16 would be emulated"),
])
def test_cpu_dtype_follows_the_capabilities(caps, dtype, reason):
    assert cpu_dtype(caps) == cpu_dtype(caps, "auto") == (dtype, reason)


@pytest.mark.parametrize("requested", [torch.float32, "float32", "torch.float32"])
@pytest.mark.parametrize("caps", [SAPPHIRE_RAPIDS, COOPER_LAKE_OR_ZEN4, HASWELL])
def test_an_explicit_dtype_wins(requested, caps):
    assert cpu_dtype(caps, requested) == (torch.float32, "asked for")
    assert cpu_dtype(HASWELL, torch.bfloat16) == (torch.bfloat16, "asked for")  # emulated, but asked for


def test_the_output_names_what_the_cpu_has_and_the_dtype_it_gets():
    assert dp.describe_cpu(COOPER_LAKE_OR_ZEN4) == ("AVX512, avx512_bf16, no AMX: default dtype bfloat16 "
                                                    "(CPU has avx512_bf16)")
    assert dp.describe_cpu(HASWELL).startswith("AVX2, no avx512_bf16, no AMX: default dtype float32 (CPU has no")


def test_a_dtype_that_is_not_one_is_named():
    with pytest.raises(ValueError, match="dtype must be 'auto', a torch.dtype or its name, got 'float33'"):
        cpu_dtype(HASWELL, "float33")


def test_this_cpu_is_read_from_torch_and_cuda_keeps_the_checkpoint_dtype():
    caps = dp.cpu_capabilities()
    assert caps.isa == torch.backends.cpu.get_cpu_capability()
    assert caps.avx512_bf16 == torch.cpu._is_avx512_bf16_supported() and caps.amx == torch.cpu._is_amx_tile_supported()
    assert dp.model_dtype("cpu") == cpu_dtype(caps) and dp.device_defaults("cpu")["dtype"] == cpu_dtype(caps)[0]
    assert dp.model_dtype("cuda") == ("auto", "the checkpoint's dtype")
    import dynamic_cross_encoder

    assert dynamic_cross_encoder.device_defaults is dp.device_defaults  # still importable from the class's module
    assert dp.model_dtype("cuda:1", torch.float16) == (torch.float16, "asked for")


@pytest.mark.parametrize("torch_threads, usable, expected", [(16, 2, 2), (2, 2, None), (1, 4, None)])
def test_threads_lowered_only_past_the_usable_cores(torch_threads, usable, expected):
    assert dp.cpu_threads(torch_threads, usable) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_compiles_freeze_the_weights(dtype, tiny_model_dir):
    """Freezing reaches dynamo, which reads it while tracing, on the thread that calls (torch 2.13
    keeps config overrides per thread): the compiled CPU graph then runs the prepacked linear of
    oneDNN (bf16) or MKL (fp32), never a plain addmm. Given as torch.compile options it froze nothing."""
    with dp.inductor_settings("cpu"):
        assert torch._inductor.config.freezing
    with dp.inductor_settings("cuda"):
        assert not torch._inductor.config.freezing
    assert not torch._inductor.config.freezing  # only for the call
    model = DynamicCrossEncoder(tiny_model_dir, device="cpu", compile=True, local_files_only=True,
                                model_kwargs={"dtype": dtype})
    pairs = data.load_pairs(8, seed=1)
    model.predict(pairs, batch_size=8)  # compiles

    def profiled():
        with torch.profiler.profile() as p:
            model.predict(pairs, batch_size=8)
        return {e.key for e in p.key_averages()}

    ops = model._on_owner(profiled)
    assert {"mkldnn::_linear_pointwise", "mkl::_mkl_linear"} & ops, sorted(ops)
    assert "aten::addmm" not in ops and "aten::mm" not in ops


# ---------------------------------------------------------------- DynamicCrossEncoder on the CPU


@pytest.mark.parametrize("caps, dtype, reason", [
    (COOPER_LAKE_OR_ZEN4, torch.bfloat16, "CPU has avx512_bf16"),
    (HASWELL, torch.float32, "CPU has no native bf16 (AVX2)"),
])
def test_default_dtype_follows_the_cpu_and_describe_says_why(caps, dtype, reason, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(dp, "cpu_capabilities", lambda: caps)
    model = DynamicCrossEncoder(tiny_model_dir, device="cpu", compile=False, local_files_only=True)
    assert model.model.dtype == dtype
    assert f"; {str(dtype).removeprefix('torch.')} ({reason}" in model.describe()
    model = DynamicCrossEncoder(tiny_model_dir, device="cpu", compile=False, local_files_only=True, model_kwargs=FP32)
    assert model.model.dtype == torch.float32 and "; float32 (asked for);" in model.describe()


@pytest.fixture(scope="module")
def pairs():
    return workload(40, seed=11) + data.load_pairs(24, seed=12)


@pytest.fixture(scope="module")
def fp32_logits(tiny_cross_encoder, pairs):
    return tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY, batch_size=8)


# bf16 keeps 8 significant bits: every rounding is off by up to 2^-8 (0.4%) relative, and a logit
# carries the roundings of every layer's activations, which are of the logits' own scale. The
# library's own bf16 run (CrossEncoder, bf16, same weights and pairs) lands at 4.9% of the fp32
# logits' spread on the tiny twin, our paths at 3.8-4.9% (mean 1.4-1.5%): the bound is twice what
# bf16 alone costs, so a path only differs from it by summation order, and 5x below what a path
# that mis-masks attention or drops a layer gives.
BF16_TOL_OF_SPREAD = 0.10


def test_bf16_bound_is_what_bf16_itself_costs(tiny_model_dir, pairs, fp32_logits):
    from sentence_transformers import CrossEncoder

    library = CrossEncoder(tiny_model_dir, device="cpu", local_files_only=True, model_kwargs={"dtype": torch.bfloat16})
    diff = np.abs(library.predict(pairs, activation_fn=IDENTITY, batch_size=8) - fp32_logits).max()
    assert BF16_TOL_OF_SPREAD / 4 < diff / np.std(fp32_logits) <= BF16_TOL_OF_SPREAD


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bf16_scores_stay_near_fp32(packed, compile, tiny_model_dir, pairs, fp32_logits):
    model = DynamicCrossEncoder(tiny_model_dir, device="cpu", compile=compile, packed=packed, local_files_only=True,
                                model_kwargs={"dtype": torch.bfloat16}, max_tokens_per_batch=1024)
    assert model.model.dtype == torch.bfloat16
    out = model.predict(pairs, activation_fn=IDENTITY, batch_size=8)
    spread = float(np.std(fp32_logits))
    assert spread > 1e-3, "the fp32 logits barely vary: the comparison would prove nothing"
    diff = float(np.abs(out - fp32_logits).max())
    assert diff <= BF16_TOL_OF_SPREAD * spread, f"max |bf16 - fp32| {diff:.2e} > {BF16_TOL_OF_SPREAD} x {spread:.2e}"
    assert diff > 0, "bf16 scores equal to fp32: the model did not run in bf16"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fp32_asked_for_stays_exact(packed, tiny_model_dir, pairs, fp32_logits):
    """Compiled with the CPU's inductor options (freezing): still the reference to 1e-5."""
    model = DynamicCrossEncoder(tiny_model_dir, device="cpu", compile=True, packed=packed, local_files_only=True,
                                model_kwargs=FP32, max_tokens_per_batch=1024)
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), fp32_logits)


def test_packed_is_the_cpu_default_and_the_flags_can_turn_it_off():
    """On a CPU bucket padding does not beat the baseline (README "CPU"): the default is packed there;
    CUDA keeps the x16 buckets; --no-packed / packed=False picks the buckets anywhere."""
    import benchmark

    assert dp.device_defaults("cpu")["packed"] is True and dp.device_defaults("cuda")["packed"] is False
    assert benchmark.BenchConfig(device="cpu").packed is True
    p = benchmark.parser("test")
    assert benchmark.parse_config(p, ["--device", "cpu", "--no-packed"])[0].packed is False
    assert benchmark.parse_config(p, ["--device", "cpu", "--packed"])[0].packed is True
    assert benchmark.parse_config(p, ["--device", "cpu"])[0].packed is True
