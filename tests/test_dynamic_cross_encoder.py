"""dynamic_cross_encoder.py, padded path: bucket math, batch plans, padding, tokenization, order,
and fp32 logits equal to sentence-transformers' CrossEncoder (eager and compiled).

Scores are compared as logits (activation Identity): the sigmoid of a random-weight model's
logits sits near 0.5 for every input and would hide differences. fp32 with the same weights
differs from the reference only by summation order (~1e-7 relative), so 1e-5 absolute is a real
check as long as the reference logits themselves spread much wider than that (asserted).
"""

import random
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from dynamic_cross_encoder import DynamicCrossEncoder
from packing import PaddedBatch, bucket_length, plan_token_batches, token_buckets

from helpers import FP32, IDENTITY, TOL, assert_same_logits, spy_logits, workload


def padded(ragged, pad_id):
    """(n, longest) right-padded ids, through the padded path's own batch builder."""
    width = int(ragged.lengths.max())
    return PaddedBatch.build(ragged.flat, ragged.lengths, width=width, pad_id=pad_id).views()[0].numpy()


@pytest.fixture(scope="module")
def eager(tiny_model_dir):  # the padded path (the CPU's default is packed)
    return DynamicCrossEncoder(tiny_model_dir, compile=False, device="cpu", local_files_only=True, model_kwargs=FP32,
                               packed=False)


@pytest.fixture(scope="module")
def compiled(tiny_model_dir):
    return DynamicCrossEncoder(tiny_model_dir, compile=True, device="cpu", local_files_only=True, model_kwargs=FP32,
                               packed=False)


@pytest.fixture(scope="module")
def reference(tiny_cross_encoder):
    pairs = workload()
    return pairs, tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY, batch_size=8)


# ---- bucket math and batch plans -----------------------------------------------------------


@pytest.mark.parametrize("length, expected", [(1, 16), (16, 16), (17, 32), (0, 16), (31, 32), (32, 32), (513, 528)])
def test_bucket_length(length, expected):
    assert bucket_length(length) == expected


@pytest.mark.parametrize("length, multiple, expected", [(1, 8, 8), (9, 8, 16), (300, 256, 512), (256, 256, 256)])
def test_bucket_length_other_multiples(length, multiple, expected):
    assert bucket_length(length, multiple) == expected


@pytest.mark.parametrize(
    "budget, max_len, expected",
    [
        (512, 64, [256, 512]),
        (512, 512, [256, 512]),
        (300, 64, [256, 512]),
        (256, 1024, [256, 512, 768, 1024]),
        (2048, 512, list(range(256, 2049, 256))),
    ],
)
def test_token_buckets(budget, max_len, expected):
    buckets = token_buckets(budget, max_len)
    assert buckets == expected
    # every batch the packed path can build fits a bucket: a full budget, or one max-length pair
    assert buckets[-1] >= max(budget, max_len)


def check_plan(lengths, max_tokens, max_seqs, plan):
    """Invariants of a plan: in order, every index once, caps respected, greedy."""
    assert [i for lo, hi in plan for i in range(lo, hi)] == list(range(len(lengths)))
    for k, (lo, hi) in enumerate(plan):
        assert 1 <= hi - lo <= max_seqs
        total = sum(lengths[lo:hi])
        assert total <= max_tokens or hi - lo == 1, f"batch {lo}:{hi} has {total} tokens > {max_tokens}"
        if hi < len(lengths):  # greedy: the next sequence did not fit
            assert total + lengths[hi] > max_tokens or hi - lo == max_seqs


@pytest.mark.parametrize(
    "lengths, max_tokens, max_seqs, expected",
    [
        ([], 100, 4, []),
        ([10, 10, 10], 100, 4, [(0, 3)]),
        ([10, 10, 10, 10, 10], 100, 2, [(0, 2), (2, 4), (4, 5)]),  # batch_size cap
        ([60, 50, 40, 30], 100, 8, [(0, 1), (1, 3), (3, 4)]),  # token budget
        ([50, 50, 50], 100, 8, [(0, 2), (2, 3)]),  # exactly at the budget
        ([300, 20, 20], 64, 8, [(0, 1), (1, 3)]),  # one sequence over budget runs alone
        ([20, 300, 20], 64, 8, [(0, 1), (1, 2), (2, 3)]),
        ([5, 500, 600], 64, 8, [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_plan_token_batches(lengths, max_tokens, max_seqs, expected):
    plan = plan_token_batches(np.array(lengths, dtype=np.int64), max_tokens, max_seqs)
    assert plan == expected
    check_plan(lengths, max_tokens, max_seqs, plan)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 600), max_size=60), st.integers(16, 1024), st.integers(1, 16))
def test_plan_token_batches_properties(lengths, max_tokens, max_seqs):
    check_plan(lengths, max_tokens, max_seqs, plan_token_batches(np.array(lengths, dtype=np.int64), max_tokens, max_seqs))


# ---- padding and tokenization --------------------------------------------------------------


def test_padded_batches_are_bucketed_and_right_padded(eager, monkeypatch):
    pairs = workload(30, seed=1)
    enc = eager._encode(pairs)
    ids, lengths = padded(enc, eager.tokenizer.pad_token_id), enc.lengths
    pad_id = eager.tokenizer.pad_token_id
    seen = spy_logits(eager, monkeypatch)
    eager.predict(pairs, batch_size=8)

    assert len(seen) == -(-len(pairs) // 8)
    real_rows = []
    for input_ids, mask, types, index in seen:
        rows, width = input_ids.shape
        assert torch.all(types == 0), "XLM-R has one token type"
        assert index.tolist() == [r * width for r in range(rows)], "the head reads token 0 of each row"
        assert mask.shape == (rows, width) and rows <= 8
        assert width % 16 == 0
        row_len = mask.sum(1)
        assert width == bucket_length(int(row_len.max())), "padded past the smallest bucket"
        # the mask is a right-aligned prefix of ones: no gaps, no left padding
        assert torch.equal(mask.bool(), torch.arange(width)[None, :] < row_len[:, None])
        assert torch.all(input_ids[mask == 0] == pad_id)
        assert torch.all(input_ids[:, 0] == eager.tokenizer.cls_token_id)
        real_rows += [tuple(r[:n].tolist()) for r, n in zip(input_ids, row_len)]
    # every tokenized pair went through exactly once (sorting only reorders)
    assert sorted(real_rows) == sorted(tuple(r[:n].tolist()) for r, n in zip(ids, lengths))
    assert eager.last_timings.padded_tokens == sum(m.numel() for _, m, *_ in seen)
    assert eager.last_timings.real_tokens == int(lengths.sum())
    assert eager.last_timings.batches == len(seen)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_predict_takes_pairs_encoded_ahead(tiny_model_dir, packed, monkeypatch):
    """encode_pairs on the caller's thread, then predict without tokenizing: the same logits as
    predict on the pairs; a stale encoding (max_length changed since) or a prompt is refused."""
    model = DynamicCrossEncoder(tiny_model_dir, compile=False, packed=packed, device="cpu", model_kwargs=FP32)
    pairs = workload(40, seed=3)
    want = model.predict(pairs, batch_size=8, activation_fn=IDENTITY)
    encoded = model.encode_pairs(pairs)
    monkeypatch.setattr(model._pair_tokenizer(), "encode", lambda *a: pytest.fail("predict tokenized again"))
    assert_same_logits(model.predict(encoded, batch_size=8, activation_fn=IDENTITY), want)
    assert_same_logits(model.predict(encoded[5:9], batch_size=8, activation_fn=IDENTITY), want[5:9])
    assert model.last_timings.real_tokens == int(encoded[5:9].ids.lengths.sum())
    with pytest.raises(ValueError, match="prompt"):
        model.predict(encoded, prompt="judge: ")
    model.max_seq_length = 64
    with pytest.raises(ValueError, match=r"encoded at max_length 512, the model now truncates at 64: encode them again"):
        model.predict(encoded)


def test_tokenization_equals_cross_encoder(eager, tiny_cross_encoder):
    ce = tiny_cross_encoder
    assert eager.max_seq_length == ce.max_seq_length
    pairs = workload(20, seed=2)
    ours = eager._encode(pairs)
    ids, lengths = padded(ours, 1), ours.lengths
    enc = ce.preprocess(pairs)
    ref_lengths = enc["attention_mask"].sum(1).numpy()
    assert lengths.tolist() == ref_lengths.tolist()
    for row, ref_row, n in zip(ids, enc["input_ids"].numpy(), lengths):
        assert row[:n].tolist() == ref_row[:n].tolist()
    # the workload does exercise truncation and empty texts
    assert lengths.max() == ce.max_seq_length
    assert lengths.min() == 4  # <s></s></s></s>: both texts empty


# ---- scores --------------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_logits_equal_cross_encoder(compile, eager, compiled, reference):
    model = compiled if compile else eager
    pairs, ref = reference
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ref)


def test_default_activation_equals_cross_encoder(eager, tiny_cross_encoder):
    pairs = workload(10, seed=3)
    out = eager.predict(pairs, batch_size=4)
    ref = tiny_cross_encoder.predict(pairs, batch_size=4)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)


def test_order_restored_for_shuffled_inputs(eager, reference):
    pairs, ref = reference
    perm = np.random.default_rng(0).permutation(len(pairs))
    shuffled = [pairs[i] for i in perm]
    out = eager.predict(shuffled, activation_fn=IDENTITY, batch_size=8)
    assert_same_logits(out, eager.predict(pairs, activation_fn=IDENTITY, batch_size=8)[perm])
    assert_same_logits(out, ref[perm])


def test_batch_size_does_not_change_scores(eager, reference):
    pairs, ref = reference
    for batch_size in (1, 3, 64):
        assert_same_logits(eager.predict(pairs, activation_fn=IDENTITY, batch_size=batch_size), ref)


def test_output_types_follow_cross_encoder(eager, tiny_cross_encoder):
    pairs = workload(3, seed=4)
    assert isinstance(eager.predict(pairs, convert_to_tensor=True), torch.Tensor)
    as_list = eager.predict(pairs, convert_to_numpy=False)
    ref_list = tiny_cross_encoder.predict(pairs, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == len(ref_list) == len(pairs)


def test_random_words_pairs_cover_bucket_edges(eager, tiny_cross_encoder):
    # lengths around bucket edges (15, 16, 17 tokens, ...) are where off-by-one padding shows
    rng = random.Random(5)
    words = lambda: " ".join(rng.choices(data.WORDS, k=rng.randint(0, 40)))  # noqa: E731
    pairs = [[words(), words()] for _ in range(60)]
    lengths = eager._encode(pairs).lengths
    assert len({int(n) % 16 for n in lengths}) >= 10
    ref = tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY, batch_size=5)
    assert_same_logits(eager.predict(pairs, activation_fn=IDENTITY, batch_size=5), ref)


# ---- what CrossEncoder returns, where it returns it -------------------------------------------


@pytest.mark.parametrize("inputs", [workload(3, seed=4), ["lorem", "ipsum"], []], ids=["pairs", "single", "empty"])
def test_convert_to_tensor_matches_cross_encoder(inputs, eager, tiny_cross_encoder):
    got = eager.predict(inputs, convert_to_tensor=True, activation_fn=IDENTITY)
    want = tiny_cross_encoder.predict(inputs, convert_to_tensor=True, activation_fn=IDENTITY)
    assert isinstance(got, torch.Tensor) and (got.dtype, got.device, got.shape) == (want.dtype, want.device, want.shape)
    if inputs:
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_convert_to_tensor_returns_scores_on_the_models_device(eager, monkeypatch):
    """sentence-transformers 6 stacks the scores where the model ran (CrossEncoder._inference): on a GPU
    model a tensor on the GPU. Here the model 'is' on the meta device and its scores come back on the CPU."""
    monkeypatch.setattr(eager, "_on_owner", lambda fn, *args: torch.tensor([[0.5], [0.25]]))
    monkeypatch.setattr(DynamicCrossEncoder, "device", property(lambda self: torch.device("meta")))
    pairs = [["lorem", "ipsum"], ["dolor", "sit"]]
    out = eager.predict(pairs, convert_to_tensor=True)
    assert out.device.type == "meta" and out.shape == (2,) and out.dtype == torch.float32
    assert eager.predict(pairs[:1] * 2, convert_to_tensor=True)[0].device.type == "meta"
    assert eager.predict(pairs).tolist() == [0.5, 0.25]  # numpy and lists stay on the host


# ---- CrossEncoder's own predict runs where the packed calls run --------------------------------

PROMPT = "Score the passage for the query: "


def test_prompted_predict_never_meets_the_packed_attention(tiny_model_dir, tiny_cross_encoder, monkeypatch):
    """A packed call switches the model config's attention to the packed kernel for its forward.
    CrossEncoder's own predict (prompts, pools, device lists) must never run its forward meanwhile from
    another thread: the packed kernel gets no cu_seq_lens there (KeyError). A packed call is paused in
    its forward while a prompted call comes in from another thread."""
    model = DynamicCrossEncoder(tiny_model_dir, packed=True, compile=False, device="cpu", local_files_only=True,
                                model_kwargs=FP32)
    config, pairs = model.model.config, workload(6, seed=8)
    own = config._attn_implementation
    inside, go_on, owner, seen = threading.Event(), threading.Event(), [], []
    packed_forward, forward, submit = model._logits, model.model.forward, model._owner.submit

    def paused(*args):  # the packed call, its attention switched on
        owner.append(threading.get_ident())
        inside.set()
        assert go_on.wait(60)
        return packed_forward(*args)

    def prompted_forward(*args, **kwargs):  # CrossEncoder's own forward: which thread, which attention
        seen.append((threading.get_ident(), config._attn_implementation))
        try:
            return forward(*args, **kwargs)
        finally:
            go_on.set()

    def queued(fn, *args):  # a call handed to the model's thread while the packed one is paused
        future = submit(fn, *args)
        if inside.is_set():
            go_on.set()
        return future

    monkeypatch.setattr(model, "_logits", paused)
    monkeypatch.setattr(model.model, "forward", prompted_forward)
    monkeypatch.setattr(model._owner, "submit", queued)
    results = {}
    packed_call = threading.Thread(target=lambda: results.update(packed=model.predict(pairs, activation_fn=IDENTITY)))
    packed_call.start()
    assert inside.wait(60)
    prompted = model.predict(pairs, prompt=PROMPT, activation_fn=IDENTITY)
    packed_call.join(60)
    assert seen and all(s == (owner[0], own) for s in seen), (seen, owner, own)
    want = tiny_cross_encoder.predict(pairs, prompt=PROMPT, activation_fn=IDENTITY)
    assert_same_logits(prompted, want)
    assert_same_logits(results["packed"], tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY))
    assert np.abs(want - results["packed"]).max() > 100 * TOL, "the prompt changes the scores"
