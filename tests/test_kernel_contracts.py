"""What the CUDA kernels of the packed path rely on, checked on the CPU.

* Mean pooling sums with `index_add_`, which CUDA runs as one atomic add per token, rounded to the
  destination's dtype at every step: the sums must be fp32, or a bf16 sum stops growing at ~256x a term.
* torch's `varlen_attn` changed its signature: 2.10 takes `is_causal` and has neither `scale` nor
  `window_size`; 2.11+ take `scale` and `window_size` keyword-only. Stand-ins of each signature.
* The varlen kernels size their grid by `max_seqlen` and leave rows past it unwritten: the bound
  comes from the batch (its longest sequence and its pad tail), rounded so that graphs stay few.
"""

import inspect

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

import data
import packing
from dynamic_cross_encoder import DynamicCrossEncoder, compile_count
from packing import TOKEN_MULTIPLE, choose_attention_backend, pack_batch, pool

from helpers import FP32, IDENTITY, LONG_TEXT, assert_same_logits, workload
from test_gpu_paths import varlen_on_cpu  # noqa: F401  (a fixture: torch's varlen_attn on a CPU kernel)

# ---- mean pooling: an fp32 sum, whatever the model's dtype ---------------------------------------


@pytest.fixture
def atomic_index_add(monkeypatch):
    """index_add_ as CUDA runs it: one add per source row, each rounded to the destination's dtype
    (atomicAdd on bf16 storage). Records the destination dtypes it saw."""
    seen = []

    def add(self, dim, index, source, *, alpha=1):
        assert dim == 0 and alpha == 1 and source.dtype == self.dtype  # as the real op requires
        seen.append(self.dtype)
        for row, target in enumerate(index.tolist()):
            self[target] = self[target] + source[row]  # computed wider, stored in self's dtype
        return self

    monkeypatch.setattr(torch.Tensor, "index_add_", add)
    return seen


def test_mean_of_600_ones_is_one_in_bf16(atomic_index_add):
    """A bf16 running sum of ones stops at 256 (257 rounds to 256): the mean would be 256 / 600."""
    hidden = torch.ones(600, 8, dtype=torch.bfloat16)
    out = pool(hidden, "mean", torch.zeros(1, dtype=torch.int32), torch.zeros(600, dtype=torch.int32),
               torch.tensor([600], dtype=torch.int32))
    assert atomic_index_add == [torch.float32], "the sum reached index_add_ in the model's dtype"
    assert out.dtype == torch.bfloat16, "the head gets the model's dtype, as before"
    assert out.float().eq(1.0).all(), out


def test_mean_pooling_equals_sentence_transformers_pooling_in_bf16(atomic_index_add):
    """Several sequences, a pad tail (seq id = seqs) and an empty slot, against sentence-transformers'
    Pooling("mean") on the same rows padded (it sums in fp32 and casts back): within one bf16 step."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    gen = torch.Generator().manual_seed(0)
    lengths = [700, 3, 0, 300]
    hidden = (1 + 0.25 * torch.randn(sum(lengths) + 20, 16, generator=gen)).bfloat16()
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((20,), len(lengths))])
    out = pool(hidden, "mean", torch.zeros(len(lengths), dtype=torch.int32), seq_ids.int(), torch.tensor(lengths))
    width = max(lengths)
    grid, mask = torch.zeros(len(lengths), width, 16, dtype=torch.bfloat16), torch.zeros(len(lengths), width)
    starts = np.cumsum([0] + lengths)
    for i, n in enumerate(lengths):
        grid[i, :n], mask[i, :n] = hidden[starts[i] : starts[i] + n], 1
    want = Pooling(16, "mean")({"token_embeddings": grid, "attention_mask": mask})["sentence_embedding"]
    assert want.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2**-7, atol=0)  # one bf16 step apart at most


def test_mean_pooling_in_fp32_is_unchanged():
    """fp32 models: the same sum and division as before, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 8, generator=gen)
    seq_ids = torch.tensor([0] * 20 + [1] * 25 + [2] * 5)
    lengths = torch.tensor([20, 25])
    before = hidden.new_zeros(3, 8).index_add_(0, seq_ids, hidden)[:2] / lengths[:, None].to(hidden.dtype)
    out = pool(hidden, "mean", torch.zeros(2, dtype=torch.int32), seq_ids.int(), lengths.int())
    assert out.dtype == torch.float32 and torch.equal(out, before)


# ---- torch's varlen_attn: 2.10 and 2.11+ signatures ------------------------------------------------


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10: is_causal, no scale, no window_size."""
    CALLS.append({"is_causal": is_causal})
    return query


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    """torch 2.11+: scale and window_size keyword-only; (-1, 0) is causal."""
    CALLS.append({"scale": scale, "window_size": window_size})
    return query


CALLS: list = []


@pytest.fixture
def qkv():
    CALLS.clear()
    q = torch.randn(8, 2, 16)
    return q, torch.tensor([0, 8], dtype=torch.int32)


def test_the_stand_ins_have_the_signatures_of_torch():
    """The installed torch (2.11+ here) has the newer signature; 2.10's is the other stand-in's."""
    if packing.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    installed = inspect.signature(packing.varlen_attn).parameters
    assert installed["window_size"].kind == installed["scale"].kind == inspect.Parameter.KEYWORD_ONLY
    assert "is_causal" not in installed
    assert "is_causal" in inspect.signature(varlen_2_10).parameters


@pytest.mark.parametrize("causal", [False, True])
def test_torch_2_10_varlen_gets_is_causal(causal, qkv, monkeypatch):
    monkeypatch.setattr(packing, "varlen_attn", varlen_2_10)
    q, cu = qkv
    assert packing.ATTENTION_BACKENDS["varlen_attn"](q, q, q, cu, 8, 16**-0.5, causal=causal) is q
    assert CALLS == [{"is_causal": causal}]


@pytest.mark.parametrize("causal, window, expected", [(False, None, (-1, -1)), (True, None, (-1, 0)),
                                                     (False, 3, (3, 3)), (True, 3, (3, 0))])
def test_torch_2_11_varlen_gets_window_size(causal, window, expected, qkv, monkeypatch):
    monkeypatch.setattr(packing, "varlen_attn", varlen_2_11)
    q, cu = qkv
    packing.ATTENTION_BACKENDS["varlen_attn"](q, q, q, cu, 8, 16**-0.5, causal=causal, window=window)
    packing.ATTENTION_BACKENDS["varlen_attn"](q, q, q, cu, 8, 0.5, causal=causal, window=window)
    assert CALLS[0]["window_size"] == expected and CALLS[0]["scale"] is None  # the kernel's default scale
    assert CALLS[1] == {"scale": 0.5, "window_size": expected}


def test_torch_2_10_varlen_refuses_a_window_and_a_scale(qkv, monkeypatch):
    monkeypatch.setattr(packing, "varlen_attn", varlen_2_10)
    q, cu = qkv
    with pytest.raises(TypeError, match="window"):
        packing.ATTENTION_BACKENDS["varlen_attn"](q, q, q, cu, 8, 16**-0.5, window=3)
    with pytest.raises(TypeError, match="scale"):
        packing.ATTENTION_BACKENDS["varlen_attn"](q, q, q, cu, 8, 0.5)
    assert CALLS == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_windowed_models_get_varlen_attn_only_where_it_takes_a_window(dtype, monkeypatch):
    monkeypatch.setattr(packing, "flash_attn_varlen_func", None)
    monkeypatch.setattr(packing, "varlen_attn", varlen_2_10)
    assert choose_attention_backend("cuda", dtype)[0] == "varlen_attn"  # no window: 2.10 serves it
    name, _ = choose_attention_backend("cuda", dtype, window=True)
    assert name == "sdpa_padded"
    with pytest.raises(ValueError, match=r"attention_backend must be one of \['sdpa_padded', .*got 'varlen_attn'"):
        choose_attention_backend("cuda", dtype, "varlen_attn", window=True)
    monkeypatch.setattr(packing, "varlen_attn", varlen_2_11)
    assert choose_attention_backend("cuda", dtype, window=True)[0] == "varlen_attn"


# ---- the varlen grid: sized by the batch, not by max_seq_length ----------------------------------


@pytest.mark.parametrize("longest, tail, expected", [
    (1, 0, 256), (256, 255, 256), (257, 0, 512), (300, 255, 512), (512, 0, 512), (513, 0, 1024),
    (20, 1000, 1024), (8192, 0, 8192), (8193, 0, 16384)])
def test_seqlen_bound(longest, tail, expected):
    assert packing.seqlen_bound(longest, tail) == expected


def test_pack_batch_bounds_every_sequence_and_the_pad_tail():
    """max_seqlen covers the pad tail too (the last sequence of cu_seqlens): a long tail raises it."""
    lengths = np.array([5, 3])
    flat = np.arange(3, 11, dtype=np.int32)
    short_tail = pack_batch(flat, lengths, max_seqs=4, pad_id=1, pin=False, sized_grid=True)
    long_tail = pack_batch(flat, lengths, max_seqs=4, pad_id=1, pin=False, tokens=2048, sized_grid=True)
    unread = pack_batch(flat, lengths, max_seqs=4, pad_id=1, pin=False, tokens=2048)  # the CPU grid's
    assert (short_tail.max_seqlen, long_tail.max_seqlen, unread.max_seqlen) == (256, 2048, 0)
    # the grid a sized batch never reads takes the bound's width: no shape beyond (tokens, max_seqlen)
    assert (short_tail.width, long_tail.width, unread.width) == (256, 2048, 512)
    for batch in (short_tail, long_tail):
        cu = batch.views()[5]
        assert int((cu[1:] - cu[:-1]).max()) <= batch.max_seqlen
    assert long_tail.shape_key == ("packed", 2048, 4, 2048) and unread.shape_key == ("packed", 2048, 4, 0)


def load(path, **kwargs):
    return DynamicCrossEncoder(path, device="cpu", local_files_only=True, model_kwargs=FP32, packed=True, **kwargs)


def grid_bounds(model, monkeypatch) -> list[tuple[int, int]]:
    """(max_seqlen given to the kernel, longest sequence of the batch, pad tail included) per call."""
    seen, original = [], model._logits

    def spy(*args):
        cu = args[5]
        seen.append((args[-1], int((cu[1:] - cu[:-1]).max())))
        return original(*args)

    monkeypatch.setattr(model, "_logits", spy)
    return seen


def test_varlen_grid_is_sized_by_the_batch(varlen_on_cpu, tiny_model_dir, monkeypatch):  # noqa: F811
    """The tiny twin allows 1024 positions (asked for here); its short pairs need a grid of 256. The CPU kernel leaves
    rows past max_seqlen NaN, as the CUDA kernel leaves them unwritten: the scores show a bound too small."""
    model = load(tiny_model_dir, compile=False, attention_backend="sdpa_padded", max_tokens_per_batch=1024,
                 max_length=1024)
    model.attention_backend = "varlen_attn"  # the registered fast_rerank_varlen_attn runs the packed calls
    pairs = data.load_pairs(10, seed=9, min_sentences=1, max_sentences=3) + [[LONG_TEXT, "lorem"]]
    bounds = grid_bounds(model, monkeypatch)
    ce = CrossEncoder(tiny_model_dir, device="cpu", local_files_only=True, max_length=1024, model_kwargs=FP32)
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ce.predict(pairs, activation_fn=IDENTITY))
    assert all(longest <= bound == packing.seqlen_bound(longest, 0) for bound, longest in bounds), bounds
    assert {bound for bound, _ in bounds} == {256, 1024}, "one batch of short pairs, one with the long one"


def test_compiled_varlen_grid_bound_costs_no_graphs(varlen_on_cpu, tiny_model_dir, tiny_cross_encoder):  # noqa: F811
    """A dynamic graph takes max_seqlen as a symbolic int: batches of many lengths, one graph."""
    model = load(tiny_model_dir, compile=True, attention_backend="sdpa_padded", max_tokens_per_batch=1024)
    model.attention_backend = "varlen_attn"
    model.warmup(batch_size=8)
    before = compile_count()
    pairs = workload(30, seed=13) + [[data.SENTENCES[1] * 40, data.SENTENCES[2] * 40]]
    out = model.predict(pairs, activation_fn=IDENTITY, batch_size=8)
    assert_same_logits(out, tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY))
    assert compile_count() == before and model.compiles <= 2


def test_cuda_graph_warmup_covers_every_grid_bound(tiny_model_dir, monkeypatch):
    """Under CUDA graphs each (token count, max_seqlen) is its own recording: warm-up runs each one a
    batch can meet, its dummy batch bounded exactly so, and later batches of any length meet no new one."""
    monkeypatch.setattr(DynamicCrossEncoder, "uses_cuda_graphs", property(lambda self: True))
    model = load(tiny_model_dir, compile=False, max_tokens_per_batch=1024, max_length=512)
    model.compile_enabled = True  # graphs per shape, without compiling here
    model.attention_backend = "varlen_attn"
    shapes = model._warmup_shapes(2)
    # 2 pairs of at most 256 tokens fill at most 512; (256, 512) would need a pair over 256 in 256 tokens
    assert shapes == [(1024, 512), (768, 512), (512, 512), (512, 256), (256, 256)]
    for shape in shapes:
        batch = model._dummy_batch(shape, 2)
        assert (batch.tokens, batch.max_seqlen, batch.max_seqs) == (*shape, 2)
        assert batch.tokens - batch.real_tokens < TOKEN_MULTIPLE, "a pad tail no real batch has"
    shapes_run = []  # every input shape and int of each launch: a CUDA graph is recorded per distinct one

    def launch(*args):
        shapes_run.append(tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args))
        return torch.zeros(args[6].shape[0], 1)

    monkeypatch.setattr(model, "_logits", launch)
    model.warmup(batch_size=2)
    warm, shapes_run[:] = set(shapes_run), []
    rng = np.random.default_rng(0)
    pairs = [[" ".join(rng.choice(data.WORDS, size=int(n))), ""] for n in rng.integers(0, 700, size=40)]
    lengths = model._encode(pairs).lengths
    assert lengths.min() < 100 and ((lengths > 256) & (lengths < 512)).any() and lengths.max() == 512
    model.predict(pairs, batch_size=2)
    assert model.unwarmed_shapes == [] and model.last_timings.batches == 20
    assert set(shapes_run) <= warm, set(shapes_run) - warm
