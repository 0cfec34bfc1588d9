"""The GPU-only behaviours, emulated on the CPU so a defect there fails here first.

* CUDA graphs: a replay writes its outputs into the same memory every time; scores of earlier
  batches must be copied out before the next launch. Inductor's graph manager is thread-local
  (torch/_inductor/cudagraph_trees.py), so every compiled call of an instance runs on one thread;
  a shape is recorded on its second call, so warm-up runs each shape twice.
* The attention backend for a CUDA device is a pure function of device type and dtype.
* torch's `varlen_attn` (CUDA only) is a custom op; a CPU kernel registered for it, computing what the
  CUDA kernel computes (causal, sliding windows, grouped heads, rows past max_q left unwritten), runs
  the packed path's real call (signature, keywords, compiled with dynamic shapes) for every family that
  takes the packed path, against CrossEncoder. Nested tensors through SDPA pick their kernel as on
  CUDA, with the memory-efficient kernel run on the CPU.
* Shapes met after warm-up, which under CUDA graphs each cost a recording inside a user's call.
* Out-of-memory recovery frees the failed batch before retrying; timing events go on the
  instance's device stream.
"""

import threading
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

import data
import dynamic_cross_encoder
import packing
from dynamic_cross_encoder import DynamicCrossEncoder, compile_count, uses_cuda_graphs
from packing import attention_backends, choose_attention_backend

from helpers import FP32, IDENTITY, assert_same_logits, reference_attention, workload


def load(path, **kwargs):
    kwargs.setdefault("packed", False)  # the padded path unless asked (the CPU's default is packed)
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
        key = tuple(getattr(a, "shape", a) for a in args)  # the packed grid width is an int
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
    assert [n for n, _ in attention_backends("cpu", torch.bfloat16)] == ["sdpa_padded", "sdpa_block_diagonal", "sdpa_nested"]
    # ModernBERT's local layers: nested tensors cannot take a window, so they are not offered
    assert [n for n, _ in attention_backends("cpu", torch.bfloat16, window=True)] == ["sdpa_padded", "sdpa_block_diagonal"]
    assert [n for n, _ in attention_backends("cuda", torch.float32, window=True)] == ["sdpa_padded", "sdpa_block_diagonal"]
    model = load(tiny_model_dir, compile=False, packed=True)
    assert "sdpa_padded (CPU: per-sequence grid, GEMMs packed)" in model.describe()


def test_cuda_graph_modes_are_named():
    assert uses_cuda_graphs("cuda", True, "max-autotune") and uses_cuda_graphs("cuda", True, "reduce-overhead")
    assert not uses_cuda_graphs("cuda", True, "default") and not uses_cuda_graphs("cuda", True, "max-autotune-no-cudagraphs")
    assert not uses_cuda_graphs("cpu", True, "max-autotune") and not uses_cuda_graphs("cuda", False, "max-autotune")


# ---- torch's varlen_attn: old and new signatures, and a CPU kernel for its op (tests/test_varlen_emulation.py) --


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
    """torch_attn::_varlen_attn (torch 2.13's schema) on the CPU, computed as the CUDA kernel (flash
    attention's varlen forward) defines it, one sequence at a time with explicit scores:

    * query i of a sequence (lq queries, lk keys) sees key j when i + lk - lq - left <= j <= i + lk - lq
      + right, (left, right) = window_size, -1 unbounded (flash-attention's window, bottom-right aligned);
      is_causal sets right to 0;
    * query head h reads key/value head h // (query heads / key heads) (grouped-query attention);
    * a query that sees no key gets zeros; rows past max_q in a sequence stay unwritten (NaN here), as
      the CUDA grid, sized by max_q, leaves them.
    """
    if seqused_k is not None or block_table is not None or cu_seq_k is None:
        raise NotImplementedError("paged or partial keys are not emulated")
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32, "the CUDA kernel takes int32 cu_seqlens only"
    left, right = window_size if window_size is not None else (-1, -1)
    right = 0 if is_causal else right
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.full_like(query, float("nan"))
    lse = torch.full((heads, query.shape[0]), float("nan"), dtype=torch.float32)
    bounds = zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), cu_seq_k[:-1].tolist(), cu_seq_k[1:].tolist())
    for qa, qb, ka, kb in bounds:
        rows = min(qb - qa, max_q)
        if rows <= 0:
            continue
        q = query[qa : qa + rows].transpose(0, 1)  # (heads, rows, dim)
        k, v = (x[ka:kb].repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1) for x in (key, value))
        i = torch.arange(rows)[:, None] + (kb - ka) - (qb - qa)  # bottom-right aligned
        j = torch.arange(kb - ka)[None, :]
        seen = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
        scores = (q @ k.transpose(1, 2) * scale).masked_fill(~seen, float("-inf"))
        probs = torch.where(seen.any(-1)[:, None], torch.softmax(scores, -1), 0.0)  # NaN inputs stay NaN
        out[qa : qa + rows] = (probs @ v).transpose(0, 1)
        lse[:, qa : qa + rows] = torch.logsumexp(scores, -1)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


@pytest.fixture
def varlen_on_cpu():
    """The emulating kernel registered for the CPU; yields the list of (is_causal, window_size, query heads,
    key heads) of every call it gets."""
    if packing.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    calls = []

    def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
               *rest):
        calls.append((bool(is_causal), tuple(window_size or (-1, -1)), query.shape[1], key.shape[1]))
        return _varlen_cpu_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale, window_size,
                                  *rest)

    lib = torch.library.Library("torch_attn", "FRAGMENT")
    torch.library.register_kernel("torch_attn::_varlen_attn", "cpu", kernel, lib=lib)
    yield calls
    lib._destroy()


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


def test_cuda_graph_warmup_runs_each_shape_twice(graphs_model, monkeypatch):
    """cudagraph trees run a new shape eagerly in the graph pool first and record it on its second call
    (CUDAGraphTreeManager._run: run_eager until the function is warmed up, then record_function)."""
    runs = {}
    original = graphs_model._logits

    def count(*args):
        runs[tuple(args[0].shape)] = runs.get(tuple(args[0].shape), 0) + 1
        return original(*args)

    monkeypatch.setattr(graphs_model, "_logits", count)
    graphs_model.warmup(batch_size=4)
    assert runs == {shape: 2 for shape in graphs_model._warmup_shapes(4)}


def test_cuda_graph_recordings_are_counted_not_shapes(graphs_model):
    # a shape run once before warm-up was never recorded: its recording comes in the next call
    graphs_model.predict([["lorem", "ipsum"]] * 2, batch_size=2)
    graphs_model.warmup(batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warm shapes: 0 recordings, no warning
        graphs_model.predict([["lorem", "ipsum"]] * 4, batch_size=4)
    with pytest.warns(UserWarning, match=r"0 graph compile\(s\) after warm-up and 1 CUDA-graph recording\(s\)"):
        graphs_model.predict([["lorem", "ipsum"]] * 2, batch_size=2)


def test_warmup_without_cuda_graphs_runs_each_shape_once(tiny_model_dir, monkeypatch):
    model = load(tiny_model_dir, compile=True, dynamic=False, max_length=32)
    calls = []
    original = model._logits
    monkeypatch.setattr(model, "_logits", lambda *args: calls.append(tuple(args[0].shape)) or original(*args))
    model.warmup(batch_size=2)
    assert sorted(calls) == sorted(model._warmup_shapes(2))  # a static compile needs no second run



def test_dynamic_padded_warmup_compiles_one_graph(tiny_model_dir, tiny_cross_encoder):
    """A batch of one row is specialized by dynamo (sizes 0 and 1 always are), so it was a second graph
    and a second compile in every warm-up; it gets a filler row instead."""
    model = load(tiny_model_dir, compile=True, max_length=64)
    model.warmup(batch_size=4)
    assert model.compiles == 1
    pairs = [["lorem ipsum", "dolor"]]
    out = model.predict(pairs, activation_fn=IDENTITY)
    assert model.compiles == 1 and model.last_timings.new_shapes == [("padded", 2, 16)]  # dynamic: no new graph
    assert abs(out[0] - tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY)[0]) <= 1e-5  # fp32, filler row dropped

# ---- out of memory: the retry runs after the failed batch is freed -----------------------------


def test_out_of_memory_retry_runs_after_the_failed_batch_is_freed(tiny_model_dir, reference, monkeypatch):
    """pytorch issue 18853: inside `except`, the traceback keeps the failed attempt's frames (and their
    tensors) alive, so a retry there competes with the batch that failed."""
    model = load(tiny_model_dir, compile=False)
    pairs, ref = reference
    original, failed, alive_at_retry = model._logits, [], []

    def forward(*args):
        if not failed:  # the first batch runs out of memory after allocating its activations
            activations = torch.empty(1 << 16)
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (emulated)")
        if not alive_at_retry:
            alive_at_retry.append(failed[0]() is not None)
        return original(*args)

    monkeypatch.setattr(model, "_logits", forward)
    with pytest.warns(UserWarning, match="out of memory on a batch of 8 pairs"):
        out = model.predict(pairs, activation_fn=IDENTITY, batch_size=8)
    assert alive_at_retry == [False], "the failed batch's tensors were alive when the retry ran"
    assert_same_logits(out, ref)  # every pair, in the caller's order


# ---- one thread owns every compiled call of an instance ----------------------------------------


def test_every_compiled_call_runs_on_one_thread(tiny_model_dir, tiny_cross_encoder, monkeypatch):
    model = load(tiny_model_dir, compile=False)
    original, threads = model._logits, set()

    def record(*args):
        threads.add(threading.get_ident())
        return original(*args)

    monkeypatch.setattr(model, "_logits", record)
    model.warmup(batch_size=4)  # from this thread
    inputs = [data.load_pairs(5 + 3 * t, seed=200 + t, min_sentences=1, max_sentences=8) for t in range(4)]
    refs = [tiny_cross_encoder.predict(p, activation_fn=IDENTITY) for p in inputs]
    results, callers, errors = {}, set(), []
    start = threading.Barrier(4)

    def work(t):
        try:
            callers.add(threading.get_ident())
            start.wait()
            results[t] = model.predict(inputs[t], activation_fn=IDENTITY, batch_size=4)
            assert model.host_seconds(inputs[t], batch_size=4) > 0
        except Exception as e:  # surfaced below; an exception in a thread would otherwise be lost
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    assert not errors
    assert len(threads) == 1 and not threads & (callers | {threading.get_ident()}), threads
    for t in range(4):
        assert_same_logits(results[t], refs[t])


def test_errors_reach_the_caller_unchanged(tiny_model_dir, monkeypatch):
    model = load(tiny_model_dir, compile=False)
    error = KeyError("raised inside the forward")

    def fail(*args):
        raise error

    monkeypatch.setattr(model, "_logits", fail)
    with pytest.raises(KeyError) as raised:
        model.predict([["lorem", "ipsum"]])
    assert raised.value is error
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        model.predict([["lorem", "ipsum"]], batch_size=0)


# ---- nested tensors through SDPA: known lengths, no empty sequence ----------------------------


def test_nested_attention_passes_its_length_bounds_and_no_empty_sequence(monkeypatch):
    built, original = [], torch.nested.nested_tensor_from_jagged

    def spy(values, offsets, *args, **kwargs):
        built.append((offsets, kwargs))
        return original(values, offsets, *args, **kwargs)

    monkeypatch.setattr(torch.nested, "nested_tensor_from_jagged", spy)
    cu = torch.tensor([0, 7, 7, 8, 20, 20, 23, 40, 40, 40], dtype=torch.int32)  # empty slots inside and at the end
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 8, generator=gen) for _ in range(3))
    out = packing.ATTENTION_BACKENDS["sdpa_nested"](q, k, v, cu, 17, 0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, cu, 0.3), rtol=0, atol=1e-5)
    assert len(built) == 3
    for offsets, kwargs in built:
        lengths = offsets.diff()
        # SDPA reads these instead of computing them with .item(); a zero-length sequence sends it to math
        assert lengths.min() >= kwargs.get("min_seqlen", 0) >= 1
        assert lengths.max() <= kwargs.get("max_seqlen", 0)


def _efficient_attention_cpu(query, key, value, bias, cu_q, cu_k, max_q, max_k, dropout_p, custom_mask_type,
                             compute_log_sumexp=False, *, scale=None, seqlen_k=None, window_size=None):
    """aten::_efficient_attention_forward on the CPU: (1, tokens, heads, dim), per-sequence SDPA."""
    out = torch.zeros_like(query[0])
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        if b > a:
            seg = [x[0, a:b].transpose(0, 1) for x in (query, key, value)]
            out[a:b] = F.scaled_dot_product_attention(*seg, scale=scale).transpose(0, 1)
    none = torch.empty((), dtype=torch.int64)
    return out.unsqueeze(0), torch.empty(0), none, none.clone(), max_q, max_k


@pytest.fixture
def nested_sdpa_as_on_cuda(monkeypatch):
    """SDPA on nested tensors picks its kernel as for fp32 on a CUDA device (torch/nested/_internal/sdpa.py:
    memory-efficient unless a sequence is empty, then math), and the efficient kernel runs on the CPU."""
    import torch.nested._internal.sdpa as nested_sdpa

    monkeypatch.setattr(nested_sdpa, "can_use_efficient_attention", lambda params, debug=False: True)
    monkeypatch.setattr(nested_sdpa, "can_use_flash_attention", lambda params, debug=False: False)  # fp32
    monkeypatch.setattr(nested_sdpa, "can_use_cudnn_attention", lambda params, debug=False: False)
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_efficient_attention_forward", _efficient_attention_cpu, "CPU")
    yield
    lib._destroy()


def test_compiled_nested_attention_is_one_graph(nested_sdpa_as_on_cuda, tiny_model_dir, reference):
    from torch._dynamo.utils import counters

    model = load(tiny_model_dir, compile=True, packed=True, attention_backend="sdpa_nested", max_tokens_per_batch=512)
    pairs, ref = reference
    graphs, breaks = compile_count(), sum(counters["graph_break"].values())
    model.warmup(batch_size=8)
    out = model.predict(pairs, activation_fn=IDENTITY, batch_size=8)
    # the lengths came from .item() before: a graph break per layer, and a sync per layer eager
    assert (compile_count() - graphs, sum(counters["graph_break"].values()) - breaks) == (1, 0)
    assert_same_logits(out, ref)  # fp32, same weights


# ---- timing events on the instance's device -----------------------------------------------------


def test_timing_events_record_on_the_instance_devices_stream(tiny_model_dir, monkeypatch):
    """torch.cuda.Event.record() without a stream uses the current device's (torch/cuda/streams.py):
    for cuda:1 that measures nothing."""
    recorded = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", torch.device(device)))
    model = load(tiny_model_dir, compile=False)
    batch = model._dummy_batch((2, 16), 2)
    monkeypatch.setattr(type(batch), "device_args", lambda self, device: self.views())
    model._dev = torch.device("cuda:1")  # the tensors stay on the CPU; only the events see the device
    events = []
    model._run_batch(batch, dynamic_cross_encoder.CallTimings(), events)
    assert len(events) == 1 and recorded == [("stream of", torch.device("cuda:1"))] * 2
