"""dynamic_cross_encoder.py under bad or unusual input: validation with the offending index named,
argument checks, out-of-memory splitting, property-based agreement with CrossEncoder, threads,
rank(), and models the packed path cannot run.

Logits (activation Identity) are compared at 1e-5: fp32 with the same weights differs from the
reference only by summation order; the reference must spread much wider than that (asserted).
"""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sentence_transformers import CrossEncoder

import data
from dynamic_cross_encoder import DynamicCrossEncoder

from helpers import FP32, IDENTITY, TOL, assert_same_logits, spy_logits

SMALL_MAX_LENGTH = 64  # keeps the property-based test fast; texts go well past it


def load(path, **kwargs):
    kwargs.setdefault("packed", False)  # the padded path unless asked (the CPU's default is packed)
    return DynamicCrossEncoder(path, device="cpu", local_files_only=True, model_kwargs=FP32, **kwargs)


@pytest.fixture(scope="module")
def models_64(tiny_model_dir):
    """The paths under test at max_length 64: padded eager, packed eager, padded compiled."""
    return {
        "padded": load(tiny_model_dir, compile=False, max_length=SMALL_MAX_LENGTH),
        "packed": load(tiny_model_dir, compile=False, packed=True, max_tokens_per_batch=512, max_length=SMALL_MAX_LENGTH),
        "padded-compiled": load(tiny_model_dir, compile=True, max_length=SMALL_MAX_LENGTH),
    }


@pytest.fixture(scope="module")
def ce_64(tiny_model_dir):
    return CrossEncoder(tiny_model_dir, device="cpu", local_files_only=True, max_length=SMALL_MAX_LENGTH,
                        model_kwargs={"dtype": torch.float32})


@pytest.fixture(scope="module")
def eager(models_64):
    return models_64["padded"]


PAIRS = data.load_pairs(12, seed=21, min_sentences=1, max_sentences=6) + [["", ""], ["lorem", ""]]


# ---- input validation ----------------------------------------------------------------------


def test_empty_list_gives_empty_result(eager):
    out = eager.predict([])
    assert isinstance(out, np.ndarray) and out.shape == (0,)
    assert eager.predict([], convert_to_tensor=True).shape == (0,)


def test_empty_strings_are_scored(eager, ce_64):
    pairs = [["", ""], ["", "lorem"], ["ipsum", ""]]
    out = eager.predict(pairs, activation_fn=IDENTITY)
    assert out.shape == (3,) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ce_64.predict(pairs, activation_fn=IDENTITY), rtol=0, atol=TOL)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", 1.5, ["nested"]])
def test_non_string_text_names_its_index(eager, bad):
    pairs = [["a", "b"], ["c", "d"], ["e", bad]]
    with pytest.raises(TypeError, match=r"inputs\[2\]\[1\]"):
        eager.predict(pairs)


def test_non_string_first_text_names_its_index(eager):
    with pytest.raises(TypeError, match=r"inputs\[1\]\[0\]"):
        eager.predict([("a", "b"), (7, "d")])


@pytest.mark.parametrize("item", [("a", "b", "c"), ("a",), "a bare string", None], ids=["3-tuple", "1-tuple", "str", "None"])
def test_malformed_pair_names_its_index(eager, item):
    with pytest.raises((TypeError, ValueError), match=r"inputs\[1\]"):
        eager.predict([["a", "b"], item, ["c", "d"]])


def test_numpy_and_tuple_inputs_equal_list_input(eager):
    as_list = eager.predict(PAIRS, activation_fn=IDENTITY)
    as_tuples = eager.predict(tuple(tuple(p) for p in PAIRS), activation_fn=IDENTITY)
    as_array = eager.predict(np.array(PAIRS), activation_fn=IDENTITY)
    as_objects = eager.predict(np.array(PAIRS, dtype=object), activation_fn=IDENTITY)
    np.testing.assert_array_equal(as_tuples, as_list)
    np.testing.assert_array_equal(as_array, as_list)
    np.testing.assert_array_equal(as_objects, as_list)


@pytest.mark.parametrize(
    "single",
    [["lorem ipsum", "dolor sit"], ("lorem ipsum", "dolor sit"), np.array(["lorem ipsum", "dolor sit"])],
    ids=["list", "tuple", "numpy"],
)
def test_single_pair_returns_a_scalar_like_cross_encoder(eager, ce_64, single):
    out = eager.predict(single)
    ref = ce_64.predict(single)
    assert np.ndim(out) == 0 and np.ndim(ref) == 0
    assert type(out) is type(ref)
    assert abs(float(out) - float(ref)) <= TOL
    assert float(out) == float(eager.predict([list(single)])[0])


def test_max_length_beyond_positions_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="1024"):
        load(tiny_model_dir, compile=False, max_length=5000)
    assert load(tiny_model_dir, compile=False, max_length=1024).max_seq_length == 1024


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8"])
def test_bad_batch_size_refused(eager, value):
    with pytest.raises(ValueError, match="batch_size"):
        eager.predict(PAIRS, batch_size=value)
    with pytest.raises(ValueError, match="batch_size"):
        eager.warmup(batch_size=value)


@pytest.mark.parametrize("name, value", [("max_tokens_per_batch", 0), ("max_tokens_per_batch", -1), ("max_tokens_per_batch", 1.5),
                                         ("bucket_multiple", 0), ("max_length", 0)])
def test_bad_constructor_arguments_refused(tiny_model_dir, name, value):
    with pytest.raises(ValueError, match=name):
        load(tiny_model_dir, compile=False, packed=True, **{name: value})


# ---- out of memory -------------------------------------------------------------------------


def oom_above(model, monkeypatch, limit: int):
    """Make the model's forward raise OutOfMemoryError for batches of more than `limit` pairs;
    returns a function giving the sizes of the batches that ran so far."""

    def sizes(*args):
        return 1 + int(torch.count_nonzero(args[6])) if model.packed else args[0].shape[0]  # pool index: 0, then the other starts

    def oom(*args):
        if sizes(*args) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory")

    calls = spy_logits(model, monkeypatch, before=oom)
    return lambda: [sizes(*args) for args in calls]


@pytest.mark.parametrize("path", ["padded", "packed"])
def test_out_of_memory_splits_and_scores_every_pair(path, models_64, ce_64, monkeypatch):
    model = models_64[path]
    ref = ce_64.predict(PAIRS, activation_fn=IDENTITY)
    ran = oom_above(model, monkeypatch, 2)
    with pytest.warns(UserWarning, match="out of memory.*split"):
        out = model.predict(PAIRS, activation_fn=IDENTITY, batch_size=8)
    assert sum(ran()) == len(PAIRS) and max(ran()) <= 2
    assert_same_logits(out, ref)


@pytest.mark.parametrize("path", ["padded", "packed"])
def test_out_of_memory_on_a_single_pair_is_raised(path, models_64, monkeypatch):
    oom_above(models_64[path], monkeypatch, 0)
    with pytest.raises(torch.OutOfMemoryError):
        models_64[path].predict([["lorem", "ipsum"]])


# ---- property: any workload, caller's order, reference logits ------------------------------

text = st.lists(st.sampled_from(data.WORDS), max_size=90).map(" ".join)  # 0 words up to ~2x max_length tokens
ANCHORS = [["lorem", ""], [" ".join(data.WORDS[:40]), "dolor"], ["", ""]]  # logits known to differ


@settings(max_examples=25, deadline=None)
@given(
    base=st.lists(st.tuples(text, text), min_size=1, max_size=10),
    picks=st.lists(st.integers(0, 1000), min_size=1, max_size=16),
    rng=st.randoms(use_true_random=False),
)
def test_any_workload_matches_cross_encoder(models_64, ce_64, base, picks, rng):
    pairs = [list(base[i % len(base)]) for i in picks] + ANCHORS  # duplicates on purpose
    rng.shuffle(pairs)
    ref = ce_64.predict(pairs, activation_fn=IDENTITY, batch_size=8)
    for name, model in models_64.items():
        out = model.predict(pairs, activation_fn=IDENTITY, batch_size=8)
        assert_same_logits(out, ref, what=name)


# ---- threads -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["padded", "packed"])
def test_threads_get_their_own_scores(path, models_64, ce_64):
    model = models_64[path]
    inputs = [data.load_pairs(5 + 3 * t, seed=100 + t, min_sentences=1, max_sentences=8) for t in range(4)]
    refs = [ce_64.predict(p, activation_fn=IDENTITY) for p in inputs]
    results, errors = {t: [] for t in range(4)}, []

    def work(t):
        try:
            for _ in range(3):
                results[t].append(model.predict(inputs[t], activation_fn=IDENTITY, batch_size=4))
        except Exception as e:  # surfaced below; an exception in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in range(4):
        assert len(results[t]) == 3
        for out in results[t]:
            assert_same_logits(out, refs[t])


# ---- rank ----------------------------------------------------------------------------------


def test_rank_matches_cross_encoder(eager, ce_64):
    query = "lorem ipsum dolor"
    docs = [" ".join(data.SENTENCES[i : i + 1 + i % 7]) for i in range(0, 60, 3)] + ["", "lorem ipsum dolor"]
    ref = ce_64.rank(query, docs, activation_fn=IDENTITY, return_documents=True)
    out = eager.rank(query, docs, activation_fn=IDENTITY, return_documents=True)
    ref_scores = np.array([r["score"] for r in ref])
    assert ref_scores.std() > 1e-3 and np.diff(ref_scores).max() < -2 * TOL, "ties would make the order ambiguous"
    assert [r["corpus_id"] for r in out] == [r["corpus_id"] for r in ref]
    assert [r["text"] for r in out] == [r["text"] for r in ref]
    np.testing.assert_allclose([r["score"] for r in out], ref_scores, rtol=0, atol=TOL)
    top = eager.rank(query, docs, top_k=3)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in ce_64.rank(query, docs, top_k=3)]
