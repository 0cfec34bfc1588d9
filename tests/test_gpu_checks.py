"""The checks tests/test_gpu.py makes on a GPU, tested on the CPU: the bf16 tolerance, the evidence that
CUDA graphs replay, and that its CUDA-default check builds the class's CUDA defaults."""

import numpy as np
import pytest
import torch

import dynamic_cross_encoder
from device_policy import device_defaults
from dynamic_cross_encoder import DynamicCrossEncoder, uses_cuda_graphs

from helpers import (CUDA_CHECK_SIZES, IDENTITY, bf16_tolerance, cuda_api_calls, cuda_default_cases, cuda_default_kwargs,
                     cuda_default_problems, graph_replay_problems)

# ---- the bf16 tolerance: from a measured reference, never below one bf16 ulp ---------------------

FP32 = np.array([0.75, -0.5, 0.25, 0.0, -0.125])  # spread 1.25; largest |score| 0.75: bf16 ulp 2^-8


def test_bf16_tolerance_is_twice_the_measured_error_plus_one_ulp():
    bf16 = FP32 + np.array([0.03, -0.01, 0.0, 0.02, 0.0])
    assert bf16_tolerance(FP32, bf16) == pytest.approx(2 * 0.03 + 2.0**-8)
    assert bf16_tolerance(FP32, FP32 + 0.06) == pytest.approx(2 * 0.06 + 2.0**-8)  # scales with the error


def test_bf16_tolerance_floor_is_one_bf16_ulp_at_the_largest_score():
    assert bf16_tolerance(FP32, FP32) == 2.0**-8  # 0.75 is in [2^-1, 2^0): bf16 values there are 2^-8 apart
    # the ulp itself: the next bf16 value after the largest score
    top = torch.tensor(0.75, dtype=torch.bfloat16)
    assert float(torch.nextafter(top, torch.tensor(1.0, dtype=torch.bfloat16))) - 0.75 == 2.0**-8
    assert bf16_tolerance(FP32 * 4, FP32 * 4) == 2.0**-6  # 3.0 is in [2, 4)


def test_bf16_tolerance_fails_a_clearly_wrong_result():
    bf16 = FP32 + 0.03
    tol = bf16_tolerance(FP32, bf16)
    wrong = {"reversed": FP32[::-1], "constant": np.full_like(FP32, FP32.mean()), "shifted by a row": np.roll(FP32, 1)}
    for name, scores in wrong.items():
        assert np.abs(scores - FP32).max() > tol, name
    assert np.abs(bf16 - FP32).max() <= tol  # the reference's own rounding passes


@pytest.mark.parametrize("bf16", [FP32 + 0.32, FP32 + np.array([0, 0, np.nan, 0, 0])], ids=["at half the spread", "NaN"])
def test_bf16_tolerance_refuses_a_comparison_that_proves_nothing(bf16):
    with pytest.raises(AssertionError, match="not below half the reference's spread"):
        bf16_tolerance(FP32, bf16)


def test_bf16_tolerance_just_below_half_the_spread_is_accepted():
    # 2 x 0.31 + 2^-8 = 0.6239 < 0.625 = 1.25 / 2; 0.32 (above) is refused
    assert bf16_tolerance(FP32, FP32 + 0.31) == pytest.approx(0.62 + 2.0**-8)


# ---- CUDA-graph replays: positive evidence from a profiler's event names -------------------------

# what a warmed call of 2 batches looks like in a trace: copies in, a graph launch per batch, copies out
REPLAYED = ["aten::copy_", "cudaMemcpyAsync", "cudaGraphLaunch", "aten::copy_", "cudaMemcpyAsync", "cudaGraphLaunch",
            "cudaStreamSynchronize", "cudaLaunchKernel"]


def test_replays_are_evidenced_by_a_launch_per_batch():
    assert graph_replay_problems(REPLAYED, batches=2) == []
    # partitions: more graphs than batches is fine
    assert graph_replay_problems(REPLAYED + ["cudaGraphLaunch_ptsz", "cuGraphLaunch"], batches=2) == []


def test_no_replay_is_found_where_kernels_ran_eagerly():
    eager = [n.replace("cudaGraphLaunch", "cudaLaunchKernel") for n in REPLAYED]
    assert graph_replay_problems(eager, batches=2) == [
        "0 CUDA-graph launch(es) for 2 batch(es): not every batch replayed a graph"]
    assert graph_replay_problems(REPLAYED, batches=3) == [
        "2 CUDA-graph launch(es) for 3 batch(es): not every batch replayed a graph"]


def test_a_recording_inside_a_warmed_call_is_found():
    assert graph_replay_problems(REPLAYED + ["cudaStreamBeginCapture", "cudaGraphInstantiate"], batches=2) == [
        "1 CUDA-graph capture(s) inside a warmed call"]


def test_a_trace_without_cuda_calls_is_no_evidence():
    assert graph_replay_problems(["aten::copy_", "aten::linear"], batches=2) == [
        "the profiler recorded no CUDA API call: no evidence either way (is CUPTI available?)"]
    assert graph_replay_problems(REPLAYED, batches=0) == ["the call ran no batch: nothing to replay"]


def test_cuda_api_calls_returns_the_profiled_events():
    with cuda_api_calls() as names:
        torch.ones(3).add_(1)
    assert "aten::add_" in names


def test_cuda_default_check_fails_on_skipped_graphs_or_moved_scores(monkeypatch):
    from torch._dynamo.utils import counters

    ref = [0.5, -1.0, 2.0]
    before = dynamic_cross_encoder.cudagraph_skips()
    assert cuda_default_problems(before, [0.5, -1.0, 2.001], ref, tol=2e-3) == []
    assert cuda_default_problems(before, [0.5, -1.0, 2.01], ref, tol=2e-3) == [
        "scores moved from eager: max |diff| 1.0e-02 > 2.0e-03"]
    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", before + 1)  # what a skip bumps
    assert cuda_default_problems(before, ref, ref, tol=2e-3) == ["inductor skipped CUDA graphs 1 time(s)"]


# ---- the CUDA-default check builds the class's CUDA defaults --------------------------------------


def test_cuda_default_cases_cover_both_paths_default_first():
    cases = cuda_default_cases()
    assert [(packed, dtype) for packed, dtype, _ in cases] == [
        (False, torch.bfloat16), (True, torch.bfloat16), (False, torch.float32), (True, torch.float32)]
    assert [name for *_, name in cases] == ["padded-default-bf16", "packed-bf16", "padded-default-fp32", "packed-fp32"]
    assert device_defaults("cuda")["packed"] is False  # the CUDA default is the padded path (x16 buckets)


@pytest.mark.parametrize("packed,dtype,name", cuda_default_cases())
def test_cuda_default_kwargs_are_the_cuda_defaults(packed, dtype, name):
    kwargs = cuda_default_kwargs(packed, dtype)
    defaults = device_defaults("cuda")
    assert kwargs["compile_mode"] == defaults["compile_mode"] == "max-autotune" and kwargs["compile"] is True
    assert uses_cuda_graphs("cuda", kwargs["compile"], kwargs["compile_mode"])
    assert kwargs["device"] == "cuda" and kwargs["model_kwargs"] == {"dtype": dtype} and kwargs["packed"] is packed
    # nothing else is set: dynamic, the bucket multiple and the attention backend are the class's defaults
    assert set(kwargs) == {"device", "compile", "compile_mode", "packed", "model_kwargs", "activation_fn", *CUDA_CHECK_SIZES}


@pytest.mark.parametrize("packed,dtype,name", cuda_default_cases())
def test_the_gpu_test_builds_its_model_from_the_cuda_defaults(packed, dtype, name, monkeypatch):
    """Runs tests/test_gpu.py's CUDA-default check up to its model's construction, which a stand-in records."""
    import test_gpu

    marks = [m for m in test_gpu.test_cuda_default_configuration_replays_cuda_graphs.pytestmark if m.name == "parametrize"]
    assert [tuple(p.values) + (p.id,) for p in marks[0].args[1]] == cuda_default_cases()
    built = []

    class Built(Exception):
        pass

    def stand_in(path, **kwargs):
        built.append((path, kwargs))
        raise Built

    monkeypatch.setattr(test_gpu, "DynamicCrossEncoder", stand_in)
    with pytest.raises(Built):
        test_gpu.test_cuda_default_configuration_replays_cuda_graphs("twin", packed, dtype)
    assert built == [("twin", cuda_default_kwargs(packed, dtype))]
    assert built[0][1]["activation_fn"] is IDENTITY


@pytest.mark.parametrize("packed,dtype", [(False, torch.bfloat16), (True, torch.float32)])
def test_the_gpu_test_runs_on_the_cpu_up_to_the_missing_evidence(packed, dtype, tiny_model_dir, monkeypatch):
    """tests/test_gpu.py's CUDA-default check with its models on the CPU (eager fp32, CrossEncoder's references
    on the CPU, graphs assumed): every step of it runs, and the one problem left is the GPU's evidence."""
    import test_gpu
    from sentence_transformers import CrossEncoder

    def on_cpu(path, **kwargs):
        kwargs.update(device="cpu", compile=False, model_kwargs={"dtype": torch.float32})
        return DynamicCrossEncoder(path, **kwargs)

    def cross_encoder_logits(path, pairs, dtype, batch_size=16):
        return CrossEncoder(path, device="cpu", model_kwargs={"dtype": dtype}).predict(
            pairs, batch_size=batch_size, activation_fn=IDENTITY)

    traced = []

    def replay_problems(names, batches):
        traced.append((list(names), batches))
        return graph_replay_problems(names, batches)

    monkeypatch.setattr(DynamicCrossEncoder, "uses_cuda_graphs", property(lambda self: True))
    monkeypatch.setattr(test_gpu, "DynamicCrossEncoder", on_cpu)
    monkeypatch.setattr(test_gpu, "_cross_encoder_logits", cross_encoder_logits)
    monkeypatch.setattr(test_gpu, "graph_replay_problems", replay_problems)
    with pytest.raises(AssertionError) as failed:
        test_gpu.test_cuda_default_configuration_replays_cuda_graphs(tiny_model_dir, packed, dtype)
    message = str(failed.value)
    assert "the profiler recorded no CUDA API call" in message
    assert "moved from eager" not in message and "skipped CUDA graphs" not in message and "launch" not in message
    # the profiler ran around the model's forward on the model's thread: it saw its GEMMs
    (names, batches), = traced
    assert batches >= 2 and "aten::linear" in names
