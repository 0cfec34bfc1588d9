"""dynamic_cross_encoder.py, packed path: packing, variable-length attention backends, fp32 logits
equal to CrossEncoder, the token budget, and no recompiles after warm-up (padded and packed).

Logits (activation Identity) are compared at 1e-5: fp32 with the same weights differs from the
reference only by summation order; the reference must spread much wider than that (asserted).
"""

import random
import warnings

import numpy as np
import pytest
import torch
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings

import data
from dynamic_cross_encoder import DynamicCrossEncoder, compile_count
from packing import ATTENTION_BACKENDS, DYNAMIC_TOKEN_MULTIPLE, TOKEN_MULTIPLE, attention_backends, dynamic_tokens, pack_batch

from helpers import EDGE_PAIRS, FP32, IDENTITY, LONG_TEXT, TOL, assert_same_logits, reference_attention, spy_logits, workload

CPU_BACKENDS = [name for name, _ in attention_backends("cpu", torch.float32)]


@pytest.fixture(scope="module")
def packed_model(tiny_model_dir):
    """packed_model(backend, compile, **kwargs) -> DynamicCrossEncoder, built once per module."""
    cache = {}

    def get(backend=None, compile=False, **kwargs):
        key = (backend, compile, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = DynamicCrossEncoder(tiny_model_dir, packed=True, compile=compile, attention_backend=backend,
                                             device="cpu", local_files_only=True, model_kwargs=FP32, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(tiny_cross_encoder):
    pairs = workload(24)
    perm = np.random.default_rng(0).permutation(len(pairs))
    pairs = [pairs[i] for i in perm]  # shuffled: the packed path sorts, the caller's order must come back
    return pairs, tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY, batch_size=8)


# ---- pack_batch ----------------------------------------------------------------------------


def padded_ids(lengths, pad_id=1, seed=0):
    """(batch, max_len) right-padded ids; real ids never equal pad_id."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), pad_id, dtype=np.int64)
    for row, n in zip(ids, lengths):
        row[:n] = rng.integers(3, 1000, size=n)
    return ids, np.array(lengths, dtype=np.int64)


def back_to_back(ids, lengths):
    """(batch, seq) right-padded -> (tokens,) back to back, lengths."""
    return ids[np.arange(ids.shape[1])[None, :] < lengths[:, None]], lengths


def test_pack_batch_layout():
    ids, lengths = padded_ids([5, 1, 3])
    types = (np.arange(9) % 2).astype(np.int32)
    batch = pack_batch(*back_to_back(ids, lengths), tokens=16, max_seqs=5, pad_id=1, pin=False, types=types)
    flat, pos, tt, seq, slots, cu, cls, cells = batch.views()
    views = (flat, pos, tt, seq, slots, cu, cls, cells)
    assert [v.dtype for v in views] == [torch.int32] * 8
    assert [v.shape[0] for v in views] == [16] * 5 + [5 + 2, 5, 5 * 16]
    # width: the longest sequence (5), at least tokens / max_seqs (16 / 5 -> 4), rounded up to 16
    assert (batch.tokens, batch.max_seqs, batch.num_seqs, batch.real_tokens, batch.width) == (16, 5, 3, 9, 16)
    assert flat[:9].tolist() == ids[0, :5].tolist() + ids[1, :1].tolist() + ids[2, :3].tolist()
    assert flat[9:].tolist() == [1] * 7  # pad tail
    assert pos.tolist() == [2, 3, 4, 5, 6, 2, 2, 3, 4] + [1] * 7
    assert tt.tolist() == types.tolist() + [0] * 7
    assert seq.tolist() == [0] * 5 + [1] + [2] * 3 + [5] * 7  # the pad tail is nobody's: slot max_seqs
    # grid cells: sequence * width + position; the pad tail takes the first cells no sequence uses
    assert slots.tolist() == [0, 1, 2, 3, 4, 16, 32, 33, 34] + [5, 6, 7, 8, 9, 10, 11]
    assert cu.tolist() == [0, 5, 6, 9, 9, 9, 16]  # starts, unused slots empty, the end of the pad tail
    assert cls.tolist() == [0, 5, 6, 0, 0]
    assert torch.equal(cells[slots.long()], torch.arange(16, dtype=torch.int32))  # cells invert slots
    assert cells.count_nonzero() == 15  # the cells no token takes point at token 0


@pytest.mark.parametrize("pool, expected", [("first", [0, 5, 6]), ("mean", [0, 5, 6]), ("last", [4, 5, 8]),
                                            ("last_non_pad", [3, 5, 6])])
def test_pool_index_per_head(pool, expected):
    """The row each head reads: token 0, the last token, or the last token that is not the pad id
    (transformers' sequence classifiers for decoders; token 0 when a sequence is all pads)."""
    flat = np.array([7, 8, 9, 9, 1, 1, 5, 1, 1], dtype=np.int32)  # pad id 1 inside sequences on purpose
    batch = pack_batch(flat, np.array([5, 1, 3]), tokens=16, max_seqs=4, pad_id=1, pin=False, pool=pool,
                       position_offset=0)
    assert batch.views()[6][:3].tolist() == expected
    assert batch.views()[1][:9].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2]  # positions from 0 (BERT-style)


@pytest.mark.parametrize(
    "lengths, tokens, max_seqs",
    [([7, 1, 12, 3, 30], 64, 8), ([16, 16], 32, 2), ([1], 256, 32), ([200, 3, 50], 256, 3)],
)
def test_pack_batch_matches_transformers_positions(lengths, tokens, max_seqs):
    pad_id = 1
    ids, lengths = padded_ids(lengths, pad_id, seed=len(lengths))
    batch = pack_batch(*back_to_back(ids, lengths), tokens=tokens, max_seqs=max_seqs, pad_id=pad_id, pin=False)
    flat, pos, _, seq, slots, cu, cls, cells = (v.long() for v in batch.views())
    mask = torch.from_numpy(np.arange(ids.shape[1])[None, :] < lengths[:, None])
    ref_pos = XLMRobertaEmbeddings.create_position_ids_from_input_ids(torch.from_numpy(ids), pad_id)
    real = int(lengths.sum())
    assert torch.equal(pos[:real], ref_pos[mask])
    assert torch.equal(flat[:real], torch.from_numpy(ids)[mask])
    assert torch.all(flat[real:] == pad_id) and torch.all(pos[real:] == pad_id)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    assert cu.tolist() == starts.tolist() + [real] * (max_seqs - len(lengths)) + [tokens]
    assert cls.tolist() == starts[:-1].tolist() + [0] * (max_seqs - len(lengths))
    assert torch.all(flat[cls[: len(lengths)]] == torch.from_numpy(ids[:, 0]))
    # every token has a grid cell of its own, a real one in its sequence's row of the grid, the pad
    # tail past the sequences' ends: attention masks the keys there by length
    assert len(set(slots.tolist())) == tokens and int(slots.max()) < max_seqs * batch.width
    assert torch.equal(slots[:real] // batch.width, seq[:real]) and int(lengths.max()) <= batch.width
    row, col = slots[real:] // batch.width, slots[real:] % batch.width
    assert torch.all(col >= torch.from_numpy(np.append(lengths, [0] * max_seqs))[row])
    assert torch.equal(cells[slots], torch.arange(tokens))


@pytest.mark.parametrize("lengths, max_seqs, tokens", [
    ([200, 190, 150], 8, 640),  # 540 real tokens -> the next multiple of 128
    ([64, 64], 8, 128),  # exactly a multiple
    ([16, 16, 16, 16], 4, 64),  # 64 -> 128 would not fit a 4 x 16 grid: its capacity, 64
    ([40, 39], 2, 96),  # 79 -> 128 would not fit a 2 x 48 grid: 96
    ([100], 1, 112),  # one sequence: its own grid row
])
def test_dynamic_tokens_keep_the_pad_tail_short_and_inside_the_grid(lengths, max_seqs, tokens):
    lengths = np.array(lengths)
    assert dynamic_tokens(lengths, max_seqs) == tokens
    ids = np.ones(int(lengths.sum()), dtype=np.int32)
    batch = pack_batch(ids, lengths, max_seqs=max_seqs, pad_id=1, pin=False, tokens=tokens)
    assert batch.width == -(-int(lengths.max()) // 16) * 16  # the tail did not widen the grid


def test_pack_batch_raises_on_overflow():
    ids, lengths = padded_ids([10, 10, 10])
    with pytest.raises(ValueError, match="does not fit"):
        pack_batch(*back_to_back(ids, lengths), tokens=29, max_seqs=8, pad_id=1, pin=False)  # too many tokens
    with pytest.raises(ValueError, match="does not fit"):
        pack_batch(*back_to_back(ids, lengths), tokens=64, max_seqs=2, pad_id=1, pin=False)  # too many sequences
    full = pack_batch(*back_to_back(ids, lengths), tokens=30, max_seqs=3, pad_id=1, pin=False)  # exactly full: no pad tail
    assert full.views()[5].tolist() == [0, 10, 20, 30, 30]


# ---- attention backends --------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "cu",
    [
        [0, 7, 7, 8, 20, 20, 23, 40, 40, 40],  # zero-length and length-1 sequences, unused slots
        [0, 7, 7, 8, 20, 20, 23, 36, 36, 40],  # the same with a pad tail (the last sequence)
        [0, 1, 2, 3, 32, 32],  # length-1 sequences, no pad tail
        [0, 32, 32],  # one sequence
    ],
    ids=["mixed", "tail", "ones", "single"],
)
def test_attention_backend_equals_per_sequence_sdpa(backend, cu):
    gen = torch.Generator().manual_seed(0)
    tokens, heads, dim = cu[-1], 2, 8
    q, k, v = (torch.randn(tokens, heads, dim, generator=gen) * 2 for _ in range(3))
    cu = torch.tensor(cu, dtype=torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    slots, cells = grid_slots(cu)
    out = ATTENTION_BACKENDS[backend](q, k, v, cu, max_seqlen, 0.3, slots=slots, cells=cells)
    ref = reference_attention(q, k, v, cu, 0.3)
    real = int(cu[-2])  # the pad tail's rows are never read
    assert out.shape == q.shape
    assert ref.std() > 0.1
    torch.testing.assert_close(out[:real], ref[:real], rtol=0, atol=1e-5)


def grid_slots(cu: torch.Tensor, width: int | None = None):
    """(tokens,) grid cell of each token and (seqs * width,) token of each cell, for cu_seqlens as
    pack_batch lays them out: sequence * width + position for every sequence but the last, the pad
    tail, whose tokens take the first cells no sequence uses; cells nobody takes point at token 0."""
    lengths = (cu[1:] - cu[:-1]).long()
    seqs, real, tokens = len(lengths) - 1, int(cu[-2]), int(cu[-1])
    width = width or max(int(lengths[:-1].max()), -(-tokens // seqs))
    seq = torch.repeat_interleave(torch.arange(seqs), lengths[:-1])
    slots = seq * width + torch.arange(real) - cu[:-2].long()[seq]
    free = torch.ones(seqs * width, dtype=torch.bool)
    free[slots] = False
    slots = torch.cat([slots, free.nonzero()[: tokens - real, 0]])
    cells = torch.zeros(seqs * width, dtype=torch.int64).index_put_((slots,), torch.arange(tokens))
    return slots.int(), cells.int()


@pytest.mark.parametrize("backend", ["sdpa_padded", "sdpa_block_diagonal"])
@pytest.mark.parametrize("causal, window", [(True, None), (False, 3), (True, 2)])
def test_attention_backend_masks_like_a_per_sequence_reference(backend, causal, window):
    """Causal (decoder rerankers) and windowed (ModernBERT's local layers: keys within `window`)."""
    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 6, 7, 19, 19, 24, 24], dtype=torch.int32)  # no pad tail
    q, k, v = (torch.randn(24, 2, 8, generator=gen) for _ in range(3))
    slots, cells = grid_slots(cu, 16)
    out = ATTENTION_BACKENDS[backend](q, k, v, cu, 12, 0.5, causal=causal, window=window, slots=slots, cells=cells)
    ref = torch.zeros_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        i = torch.arange(b - a)
        d = i[:, None] - i[None, :]
        mask = (d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)) & (d.abs() <= (window or 10**9))
        seg = [x[a:b].transpose(0, 1) for x in (q, k, v)]
        ref[a:b] = torch.nn.functional.scaled_dot_product_attention(*seg, attn_mask=mask, scale=0.5).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_unknown_attention_backend_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        DynamicCrossEncoder(tiny_model_dir, packed=True, compile=False, attention_backend="flash_attn",
                            device="cpu", local_files_only=True)


# ---- packed scores -------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_logits_equal_cross_encoder(backend, compile, packed_model, reference):
    model = packed_model(backend, compile, max_tokens_per_batch=512)
    assert model.packed and model.attention_backend == backend
    pairs, ref = reference
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ref)
    t = model.last_timings
    # graphs per shape: token counts in multiples of 256; a dynamic graph: each pad tail under 128 tokens
    multiple = TOKEN_MULTIPLE if model.graphs_per_shape else DYNAMIC_TOKEN_MULTIPLE
    assert t.padded_tokens % TOKEN_MULTIPLE == 0 or not model.graphs_per_shape
    assert 0 <= t.padded_tokens - t.real_tokens < multiple * t.batches


def test_packed_batches_are_cut_from_length_sorted_chunks(packed_model, monkeypatch):
    """The CPU grid is as wide as a batch's longest sequence: each chunk is sorted longest first before
    its batches are cut, so like lengths share a batch; the scores still come back in the caller's order."""
    model = packed_model("sdpa_padded", False, max_tokens_per_batch=512)
    pairs = data.load_pairs(12, seed=5, min_sentences=1, max_sentences=8)
    seen, tokens, rows, pack = [], [], [], model._pack
    monkeypatch.setattr(model, "_pack", lambda flat, lengths, types, **kw: seen.append(list(lengths))
                        or tokens.append(kw["tokens"]) or rows.append(kw["max_seqs"]) or pack(flat, lengths, types, **kw))
    scores = model.predict(pairs, batch_size=3, activation_fn=IDENTITY)
    lengths = [n for batch in seen for n in batch]
    # a dynamic graph: as many grid rows as the batch has pairs (the budget cuts some batches short),
    # and each batch's token count is dynamic_tokens' for them (a tail under 128, inside the grid)
    assert rows == [len(b) for b in seen] and min(rows) < 3
    assert tokens == [dynamic_tokens(np.array(b), len(b)) for b in seen]
    assert len(seen) >= 4 and len(lengths) == 12 and lengths == sorted(lengths, reverse=True)
    given = list(model._encode(pairs).lengths)
    assert sorted(given, reverse=True) == lengths and given != lengths  # sorted here, not by the caller
    monkeypatch.undo()
    assert_same_logits(scores, model.predict(pairs[::-1], batch_size=3, activation_fn=IDENTITY)[::-1])


@pytest.mark.parametrize("compiled, dynamic, n, batch_size, rows", [
    (False, True, 1, 8, 1), (False, True, 5, 8, 5),  # eager: the pairs there are
    (True, True, 1, 8, 2), (True, True, 5, 64, 5), (True, True, 1, 1, 1),  # dynamic: no size of 1 unless all are 1
    (True, False, 1, 8, 8), (True, False, 5, 64, 64),  # a graph per shape: always batch_size
])
def test_batch_rows(packed_model, monkeypatch, compiled, dynamic, n, batch_size, rows):
    """A batch's rows (the CPU grid's rows): a dynamic graph never pads to batch_size. A batch of 64 cut
    to 12 pairs by the token budget once ran a 64-row grid: 3.8x the attention of the 12 pairs."""
    model = packed_model("sdpa_padded", False)
    monkeypatch.setattr(model, "compile_enabled", compiled)
    monkeypatch.setattr(model, "dynamic", dynamic)
    assert model.graphs_per_shape == (compiled and not dynamic)
    assert model._rows(n, batch_size) == rows


def test_dynamic_warmup_batches_are_packed_like_real_ones(packed_model):
    """A dynamic graph's warm-up batches take dynamic_tokens' count, as real batches do: a token bucket
    of 256 would leave a long pad tail and widen the CPU grid past the sequences."""
    model = packed_model("sdpa_padded", False, max_tokens_per_batch=2048)
    assert not model.graphs_per_shape and model.max_seq_length <= 512
    for batch_size, shape in ((b, shape) for b in (1, 8) for shape in model._warmup_shapes(b)):
        batch = model._dummy_batch(shape, batch_size)  # batch size 1: one pair of at most 512 for 2048
        longest = int(batch.real_tokens // batch.num_seqs)  # the dummy sequences share one length
        assert batch.tokens - batch.real_tokens < DYNAMIC_TOKEN_MULTIPLE and batch.width == -(-longest // 16) * 16


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pairs_longer_than_the_token_budget(backend, packed_model, tiny_cross_encoder, monkeypatch):
    model = packed_model(backend, False, max_tokens_per_batch=64)
    long_a = " ".join(data.SENTENCES[:18])
    pairs = [["lorem", "ipsum"], [long_a, long_a[::-1]], ["dolor", ""], [long_a, "sit amet"], ["", ""]]
    lengths = model._encode(pairs).lengths
    assert lengths.max() >= 300 and lengths.min() < 64
    calls = spy_logits(model, monkeypatch)
    ref = tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY)
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ref)
    seqs = [1 + int(torch.count_nonzero(args[6])) for args in calls]  # pool index: 0, then the other starts
    real = [int(args[5][n]) for args, n in zip(calls, seqs)]
    assert sum(seqs) == len(pairs) and len(calls) == model.last_timings.batches
    assert all(r <= 64 or n == 1 for r, n in zip(real, seqs)), "a pair over the budget shared its batch"
    assert sum(r > 64 for r in real) == 2


# ---- no recompiles after warm-up -----------------------------------------------------------


def fresh_workloads():
    rng = random.Random(7)
    words = lambda k: " ".join(rng.choices(data.WORDS, k=k))  # noqa: E731
    return [
        data.load_pairs(20, seed=11, min_sentences=1, max_sentences=3),
        data.load_pairs(13, seed=12, min_sentences=5, max_sentences=15),
        [[words(rng.randint(0, 60)), words(rng.randint(0, 300))] for _ in range(8)],  # exactly batch_size
        [["lorem", "ipsum"]],  # a single pair in a list
        ["dolor sit", "amet"],  # a single pair
        [[LONG_TEXT, LONG_TEXT]],  # at max_length
        EDGE_PAIRS,
    ]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_no_recompiles_after_warmup(packed, tiny_model_dir, tiny_cross_encoder):
    model = DynamicCrossEncoder(tiny_model_dir, packed=packed, compile=True, max_tokens_per_batch=512,
                                device="cpu", local_files_only=True, model_kwargs=FP32)
    seconds = model.warmup(batch_size=8)
    assert seconds > 0 and model.compile_seconds == seconds
    before, own = compile_count(), model.compiles
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pairs in fresh_workloads():
            out = model.predict(pairs, activation_fn=IDENTITY, batch_size=8)
            ref = tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY)
            np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)
    assert compile_count() == before, f"{compile_count() - before} graph(s) compiled after warm-up"
    assert model.compiles == own
    assert not [w for w in caught if "after warm-up" in str(w.message)]


@pytest.fixture(scope="module")
def static_model(tiny_model_dir):
    """Static graphs: one per (batch, width); warm-up compiles every width at its batch size."""
    return DynamicCrossEncoder(tiny_model_dir, compile=True, dynamic=False, max_length=64, device="cpu", local_files_only=True,
                               model_kwargs=FP32, packed=False)


SHORT = [["lorem", "ipsum"]] * 4  # one (4, 16) batch


def recompile_warnings(model, pairs, batch_size=4) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.predict(pairs, batch_size=batch_size)
    return [str(w.message) for w in caught if "after warm-up" in str(w.message)]


def test_static_warmup_covers_every_width_and_reports_a_new_batch_size(static_model):
    static_model.warmup(SHORT, batch_size=4)
    before, own = compile_count(), static_model.compiles
    longer = data.load_pairs(7, seed=3)  # widths 32 and more, and a short last batch of 3 rows
    assert not recompile_warnings(static_model, SHORT) and not recompile_warnings(static_model, longer)
    assert compile_count() == before and static_model.unwarmed_shapes == []
    with pytest.warns(UserWarning, match=r"1 graph compile\(s\) after warm-up"):
        static_model.predict(SHORT, batch_size=2)  # a batch size the warm-up did not run
    assert compile_count() == before + 1 and static_model.compiles == own + 1
    assert static_model.unwarmed_shapes == [("padded", 2, 16)]
    assert static_model.last_timings.new_shapes == [("padded", 2, 16)]
    assert not recompile_warnings(static_model, SHORT, 2)  # warned once for that graph, not on every call
    assert static_model.last_timings.new_shapes == []


def test_no_warning_for_graphs_compiled_elsewhere(static_model):
    # compiles by other code in the process (another instance, the user's own torch.compile) are
    # not this instance's recompiles
    static_model.warmup(SHORT, batch_size=4)
    own = static_model.compiles
    torch.compile(lambda x: x + 1)(torch.ones(2))
    assert not recompile_warnings(static_model, SHORT)
    assert static_model.compiles == own
