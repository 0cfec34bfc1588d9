"""The GPU-only behaviours, emulated on the CPU so a defect there fails here first.

* CUDA graphs: a replay writes its outputs into the same memory every time; scores of earlier
  batches must be copied out before the next launch.
* The attention backend for a CUDA device is a pure function of device type and dtype.
* torch's `varlen_attn` (CUDA only) is a custom op; a CPU kernel registered for it runs the packed
  path's real call (signature, keywords, compiled with dynamic shapes) against the baseline.
* Shapes met after warm-up, which under CUDA graphs each cost a recording inside a user's call.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import data
import packing
from dynamic_cross_encoder import DynamicCrossEncoder, compile_count, uses_cuda_graphs
from packing import attention_backends, choose_attention_backend

from helpers import FP32, IDENTITY, assert_same_logits, workload


def load(path, **kwargs):
    return DynamicCrossEncoder(path, device="cpu", local_files_only=True, model_kwargs=FP32, **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_cross_encoder):
    pairs = workload(30, seed=5)
    return pairs, tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY, batch_size=8)


# ---- CUDA graphs: one output buffer per shape, overwritten by every replay ----------------------


def replay_like_cuda_graphs(model, monkeypatch):
    """The compiled forward returns the same output tensor for every call of a shape, as a CUDA-graph
    replay does (torch/_inductor/cudagraph_trees.py: static outputs)."""
    original, static = model._logits, {}

    def replay(*args):
        out = original(*args)
        key = tuple(a.shape for a in args)
        buffer = static.setdefault(key, torch.empty_like(out))
        buffer.copy_(out)
        return buffer

    monkeypatch.setattr(model, "_logits", replay)
    return static


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_scores_survive_output_buffer_reuse(packed, tiny_model_dir, reference, monkeypatch):
    model = load(tiny_model_dir, compile=False, packed=packed, max_tokens_per_batch=512)
    pairs, ref = reference
    static = replay_like_cuda_graphs(model, monkeypatch)
    out = model.predict(pairs, activation_fn=IDENTITY, batch_size=4)
    assert model.last_timings.batches > len(static), "no shape was replayed: the emulation proves nothing"
    assert_same_logits(out, ref)


# ---- attention backend by device and dtype -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_full_precision_never_gets_a_half_precision_kernel(dtype):
    names = [name for name, _ in attention_backends("cuda", dtype)]
    assert "varlen_attn" not in names and "flash_attn" not in names
    name, why = choose_attention_backend("cuda", dtype)
    assert name == "sdpa_nested" and "fp16/bf16 only" in why
    with pytest.raises(ValueError, match=r"attention_backend must be one of .* got 'varlen_attn'"):
        choose_attention_backend("cuda", dtype, "varlen_attn")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_gets_a_varlen_kernel(dtype, monkeypatch):
    monkeypatch.setattr(packing, "flash_attn_varlen_func", None)
    assert choose_attention_backend("cuda", dtype)[0] == "varlen_attn"
    monkeypatch.setattr(packing, "flash_attn_varlen_func", lambda *a, **k: None)
    assert choose_attention_backend("cuda", dtype) == ("flash_attn", "flash-attn installed")


def test_cpu_backends_and_describe_say_why(tiny_model_dir):
    assert [n for n, _ in attention_backends("cpu", torch.bfloat16)] == ["sdpa_block_diagonal", "sdpa_nested"]
    model = load(tiny_model_dir, compile=False, packed=True)
    assert "sdpa_block_diagonal (CPU: fastest at small token budgets)" in model.describe()


def test_cuda_graph_modes_are_named():
    assert uses_cuda_graphs("cuda", True, "max-autotune") and uses_cuda_graphs("cuda", True, "reduce-overhead")
    assert not uses_cuda_graphs("cuda", True, "default") and not uses_cuda_graphs("cuda", True, "max-autotune-no-cudagraphs")
    assert not uses_cuda_graphs("cpu", True, "max-autotune") and not uses_cuda_graphs("cuda", False, "max-autotune")


# ---- torch's varlen_attn: old and new signatures, and its real call on a CPU kernel -----------


def test_varlen_attn_called_without_scale_on_torch_2_10(monkeypatch):
    seen = {}

    def varlen_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None):  # no `scale`
        seen["called"] = True
        return q

    monkeypatch.setattr(packing, "varlen_attn", varlen_2_10)
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    assert packing.ATTENTION_BACKENDS["varlen_attn"](q, q, q, cu, 8, 16**-0.5) is q and seen["called"]
    with pytest.raises(TypeError, match="scale"):  # a non-default scale is passed, and says so
        packing.ATTENTION_BACKENDS["varlen_attn"](q, q, q, cu, 8, 0.5)


def _varlen_cpu_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None,
                       window_size=None, enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch_attn::_varlen_attn on the CPU: per-sequence SDPA. Rows past max_q in a sequence stay
    unwritten (NaN here), as the CUDA kernel, whose grid is sized by max_q, leaves them."""
    out = torch.full_like(query, float("nan"))
    lse = torch.zeros(query.shape[1], query.shape[0], dtype=torch.float32)
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        b = min(b, a + max_q)
        if b > a:
            seg = [x[a:b].transpose(0, 1) for x in (query, key, value)]
            out[a:b] = F.scaled_dot_product_attention(*seg, scale=scale).transpose(0, 1)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


@pytest.fixture
def varlen_on_cpu():
    if packing.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    lib = torch.library.Library("torch_attn", "FRAGMENT")
    torch.library.register_kernel("torch_attn::_varlen_attn", "cpu", _varlen_cpu_kernel, lib=lib)
    yield
    lib._destroy()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled-dynamic"])
def test_packed_path_through_the_real_varlen_attn(compile, varlen_on_cpu, tiny_model_dir, reference):
    model = load(tiny_model_dir, compile=compile, packed=True, max_tokens_per_batch=512)
    model.attention_backend, model._attention = "varlen_attn", packing.ATTENTION_BACKENDS["varlen_attn"]
    pairs, ref = reference
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ref)
    if compile:
        assert model.compiles >= 1


# ---- shapes after warm-up ----------------------------------------------------------------------


def test_warmup_runs_the_largest_shape_first(tiny_model_dir):
    packed = load(tiny_model_dir, compile=False, packed=True, max_tokens_per_batch=1024)
    assert packed._warmup_shapes(8) == [1024, 256]
    padded = load(tiny_model_dir, compile=False, max_length=64)
    assert padded._warmup_shapes(8)[0] == (8, 64)


@pytest.fixture
def graphs_model(tiny_model_dir, monkeypatch):
    """A compiled model that behaves as under CUDA graphs: a graph per batch shape."""
    monkeypatch.setattr(DynamicCrossEncoder, "uses_cuda_graphs", property(lambda self: True))
    return load(tiny_model_dir, compile=True, max_length=64)


def test_cuda_graph_warmup_covers_every_shape_of_its_batch_size(graphs_model, tiny_model_dir):
    assert graphs_model._warmup_shapes(4) == [(4, 64), (4, 48), (4, 32), (4, 16)]
    graphs_model.warmup(batch_size=4)
    pairs = data.load_pairs(7, seed=1, min_sentences=1, max_sentences=4) + [["lorem", ""]]  # 8 pairs: 2 batches
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here would be a recording inside the call
        out = graphs_model.predict(pairs[:7], activation_fn=IDENTITY, batch_size=4)  # last batch of 3 rows
    assert graphs_model.unwarmed_shapes == [] and graphs_model.last_timings.new_shapes == []
    eager = load(tiny_model_dir, compile=False, max_length=64)  # the same truncation
    assert_same_logits(out, eager.predict(pairs[:7], activation_fn=IDENTITY))  # filler rows dropped


def test_cuda_graph_recording_after_warmup_is_reported(graphs_model):
    graphs_model.warmup(batch_size=4)
    before = compile_count()
    with pytest.warns(UserWarning, match=r"0 graph compile\(s\) after warm-up and 1 CUDA-graph recording\(s\)"):
        graphs_model.predict([["lorem", "ipsum"]] * 3, batch_size=2)  # batches of 2 rows: not warmed
    assert compile_count() == before  # dynamo sees nothing: only the shape count does
    assert graphs_model.last_timings.new_shapes == [("padded", 2, 16)]


def test_static_graphs_past_dynamos_recompile_limit_stay_compiled(tiny_model_dir):
    # 9 token buckets > dynamo's default limit of 8, past which it silently runs eager
    model = load(tiny_model_dir, compile=True, dynamic=False, packed=True, max_tokens_per_batch=2304, max_length=256)
    shapes = model._warmup_shapes(4)
    assert len(shapes) == 9
    model.warmup(batch_size=4)
    assert model.compiles == len(shapes)


# ---- the GPU script, dry run ------------------------------------------------------------------


def test_gpu_check_needs_an_output_folder():
    import subprocess

    done = subprocess.run(["bash", "gpu_check.sh"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: bash gpu_check.sh OUT_DIR" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without CUDA does")
def test_gpu_check_dry_run_writes_every_step(tmp_path, tiny_model_dir):
    import json
    import subprocess

    out = tmp_path / "out"
    done = subprocess.run(["bash", "gpu_check.sh", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dry run: skipping the preflight and the GPU tests (no CUDA)" in done.stdout
    assert "no CUDA device: dry run" in (out / "machine.txt").read_text()
    steps = (out / "steps.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in steps] == ["== combined-pairs", "== combined-rerank"]
    assert all(": exit 0 after" in line for line in steps)
    for name in ("combined-pairs", "combined-rerank"):
        report = json.loads((out / f"{name}.json").read_text())
        # a CPU run in bf16 (the default where the CPU has it) times its fp32 reference as a row
        timed_fp32 = name == "combined-pairs" and report["config"]["dtype"] != "float32"
        assert report["complete"] and len(report["setups"]) == 3 + timed_fp32
        assert "| DynamicCrossEncoder packed |" in (out / f"{name}.txt").read_text()  # the markdown table
