"""pair_tokenizer.py: the host tokenizer gives exactly the ids of the transformers tokenizer call that
CrossEncoder makes (`longest_first` at max_length), pair by pair, for any texts; each distinct text
is encoded once; tokenizers it cannot reproduce fall back to that call and say so."""

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bench_utils as bu
import data
from pair_tokenizer import EncodedPairs, PairTokenizer, Ragged, longest_first, ragged_arange


@pytest.fixture(scope="module")
def tokenizer(tiny_cross_encoder):
    return tiny_cross_encoder.tokenizer


def reference_ids(tokenizer, pairs, max_length) -> list[list[int]]:
    """What CrossEncoder.preprocess feeds the model, without the padding."""
    enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=max_length)
    return enc["input_ids"]


def as_lists(ragged: Ragged) -> list[list[int]]:
    s = ragged.starts
    return [ragged.flat[s[i] : s[i + 1]].tolist() for i in range(len(ragged.lengths))]


words = st.sampled_from(data.WORDS)
scripts = st.sampled_from(["Καλημέρα κόσμε", "こんにちは世界", "Привет мир", "مرحبا", "नमस्ते", "😀🎉👍🏽", "a\u200bb", "  ", "\t\n"])
text = st.one_of(
    st.lists(st.one_of(words, scripts), max_size=60).map(" ".join),  # 0 words up to ~2x the tiny limit
    st.text(max_size=80),  # any unicode, control characters and surrogates' neighbours included
    st.just(" ".join(data.SENTENCES[:60])),  # far over any limit here
)


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(text, text), min_size=1, max_size=12), max_length=st.sampled_from([32, 33, 64, 127, 512]))
def test_ids_equal_the_transformers_call(tokenizer, pairs, max_length):
    got = PairTokenizer(tokenizer, max_length).encode(pairs)
    assert as_lists(got) == reference_ids(tokenizer, pairs, max_length)


@settings(max_examples=30, deadline=None)
@given(query=text, docs=st.lists(text, min_size=1, max_size=12), max_length=st.sampled_from([32, 65, 512]))
def test_rerank_reuses_the_query_and_truncates_like_the_pair(tokenizer, query, docs, max_length):
    pairs = [(query, d) for d in docs]
    host = PairTokenizer(tokenizer, max_length)
    encoded = []
    host.backend = _Spy(host.backend, encoded)
    assert as_lists(host.encode(pairs)) == reference_ids(tokenizer, pairs, max_length)
    # one parallel encode of each distinct text: the query once, then each distinct document once
    assert encoded == [[query] + list(dict.fromkeys(docs))]


def untruncated_lengths(tokenizer, pairs) -> list[int]:
    return [len(ids) for ids in tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=False)["input_ids"]]


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(text, text), min_size=1, max_size=10), max_length=st.sampled_from([32, 127, 512]))
def test_encode_pairs_counts_the_tokens_before_truncation(tokenizer, pairs, max_length):
    """A server refuses a pair longer than max_length (truncate: false) by this count, and queues by
    the ids: both from one encode. The fallback (no backend) counts the same."""
    want = untruncated_lengths(tokenizer, pairs)
    for host in (PairTokenizer(tokenizer, max_length), PairTokenizer(_NoBackend(tokenizer), max_length)):
        got = host.encode_pairs(pairs)
        assert got.untruncated.tolist() == want and got.max_length == max_length
        assert as_lists(got.ids) == reference_ids(tokenizer, pairs, max_length)


def test_encoded_pairs_slice_and_concat(tokenizer):
    pairs = [("q", "lorem"), ("q", ""), ("q", "ipsum dolor sit"), ("r", "amet")]
    enc = PairTokenizer(tokenizer, 64).encode_pairs(pairs)
    parts = [enc[0:1], enc[1:3], enc[3:], enc[4:]]
    assert [len(p) for p in parts] == [1, 2, 1, 0]
    assert as_lists(parts[1].ids) == reference_ids(tokenizer, pairs[1:3], 64)
    assert parts[1].untruncated.tolist() == untruncated_lengths(tokenizer, pairs[1:3])
    joined = EncodedPairs.concat([parts[2], parts[0], parts[1]])
    assert as_lists(joined.ids) == reference_ids(tokenizer, pairs[3:] + pairs[:3], 64)
    assert joined.untruncated.tolist() == untruncated_lengths(tokenizer, pairs[3:] + pairs[:3])
    with pytest.raises(TypeError, match="contiguous slice"):
        enc[::2]
    with pytest.raises(ValueError, match=r"different max_length: \[32, 64\]"):
        EncodedPairs.concat([enc, PairTokenizer(tokenizer, 32).encode_pairs(pairs)])


class _Spy:
    """A tokenizers.Tokenizer stand-in that records which texts each encode_batch_fast call got."""

    def __init__(self, backend, log):
        self._backend, self._log = backend, log

    def encode_batch_fast(self, texts, **kwargs):
        self._log.append(list(texts))
        return self._backend.encode_batch_fast(texts, **kwargs)


def test_edge_pairs_and_lengths(tokenizer):
    long = " ".join(data.SENTENCES[:80])
    pairs = [("", ""), ("", long), (long, ""), (long, long), ("lorem", "ipsum"), ("ipsum", "lorem")]
    got = PairTokenizer(tokenizer, 64).encode(pairs)
    assert as_lists(got) == reference_ids(tokenizer, pairs, 64)
    assert got.lengths.tolist() == [4, 64, 64, 64, got.lengths[4], got.lengths[5]]
    assert got.flat.dtype == np.int32


@pytest.mark.parametrize("n1, n2, budget, expected", [
    (3, 4, 10, (3, 4)),      # fits: nothing cut
    (2, 20, 10, (2, 8)),     # only the longer is cut, to budget - shorter
    (20, 2, 10, (8, 2)),
    (9, 20, 10, (5, 5)),     # both cut: half each
    (20, 9, 11, (6, 5)),     # odd budget: the longer text keeps the extra token
    (9, 20, 11, (5, 6)),
    (0, 30, 10, (0, 10)),
])
def test_longest_first(n1, n2, budget, expected):
    k1, k2 = longest_first(np.array([n1]), np.array([n2]), budget)
    assert (int(k1[0]), int(k2[0])) == expected


def test_ragged_helpers():
    assert ragged_arange(np.array([2, 0, 3])).tolist() == [0, 1, 0, 1, 2]
    r = Ragged(np.array([1, 2, 3, 4, 5, 6], dtype=np.int32), np.array([2, 1, 3]))
    assert r.starts.tolist() == [0, 2, 3, 6]
    taken = r.take(np.array([2, 0]))
    assert taken.flat.tolist() == [4, 5, 6, 1, 2] and taken.lengths.tolist() == [3, 2]
    padded = np.array([[1, 2, 9, 9], [3, 9, 9, 9], [4, 5, 6, 9]])
    back = Ragged.from_padded(padded, np.arange(4)[None, :] < r.lengths[:, None])
    assert back.flat.tolist() == r.flat.tolist() and back.lengths.tolist() == r.lengths.tolist()
    left = np.array([[9, 9, 1, 2], [9, 9, 9, 3], [9, 4, 5, 6]])  # left padding, as causal rerankers have
    back = Ragged.from_padded(left, left != 9, types=(left > 2).astype(int))
    assert back.flat.tolist() == r.flat.tolist() and back.types.tolist() == [0, 0, 1, 1, 1, 1]


class _NoBackend:
    """A tokenizer with only the transformers call (as a slow Python tokenizer has)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair=pair)


def test_tokenizer_without_backend_falls_back_and_says_so(tokenizer):
    host = PairTokenizer(_NoBackend(tokenizer), 64)
    assert host.describe() == "CrossEncoder's tokenization (_NoBackend has no `tokenizers` backend)"
    pairs = [("lorem ipsum", "dolor"), ("", " ".join(data.SENTENCES[:20]))]
    assert as_lists(host.encode(pairs)) == reference_ids(tokenizer, pairs, 64)


class _OneAtATime(_NoBackend):
    """A tokenizer whose transformers call notes when two threads are inside it at once (a slow call
    widens the window), which on a real tokenizer lets one thread's settings reach another's encode."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.inside, self.overlaps, self._count = 0, 0, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._count:
            self.inside += 1
            self.overlaps += self.inside > 1
        try:
            time.sleep(0.002)
            return super().__call__(*args, **kwargs)
        finally:
            with self._count:
                self.inside -= 1


def test_fallback_tokenizer_calls_are_serialized(tokenizer):
    """A server encodes requests on several threads. The transformers call sets truncation on the
    tokenizer it shares: unserialized, one thread's count (no truncation) lands between another's
    truncation and its encode, which then silently keeps every token (155 ids at max_length 32, seen
    on this tokenizer). So the fallback's calls (encode and count) run one at a time."""
    shared = _OneAtATime(tokenizer)
    host = PairTokenizer(shared, 32)
    pairs = [("lorem ipsum dolor " * 50, "sit"), ("amet", "consectetur " * 40)]
    want = host.encode_pairs(pairs)
    got = []
    threads = [threading.Thread(target=lambda: got.extend(host.encode_pairs(pairs) for _ in range(5))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and len(got) == 20
    assert shared.overlaps == 0, "two threads were inside the shared tokenizer at once"
    assert all(as_lists(g.ids) == as_lists(want.ids) and g.untruncated.tolist() == want.untruncated.tolist()
               for g in got)


def test_left_truncation_falls_back(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "truncation_side", "left")
    assert PairTokenizer(tokenizer, 64).fallback_reason == "truncation_side='left'"


def test_dynamic_cross_encoder_names_its_host_tokenizer(tiny_model_dir):
    from dynamic_cross_encoder import DynamicCrossEncoder

    model = DynamicCrossEncoder(tiny_model_dir, device="cpu", compile=False, local_files_only=True)
    assert "host: tokenizers backend, each distinct text once" in model.describe()
    pairs = data.load_pairs(20, seed=4)
    seconds = model.host_seconds(pairs, batch_size=8)
    assert seconds > 0 and model.last_timings.batches == 0  # the last real call's timings are kept


# ---- the host ceiling the benchmark prints beside every setup ---------------------------------

def test_raw_tokenizer_gives_the_ids_it_is_timed_for(tiny_cross_encoder):
    pairs = [("lorem ipsum " * 200, "dolor"), ("", ""), ("sit", "amet " * 300)]
    tok = tiny_cross_encoder.tokenizer
    ref = tok([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=64)["input_ids"]
    assert [e.ids for e in bu.raw_tokenizer(tok, 64)(pairs)] == ref


def test_host_ceiling_counts_pairs_over_seconds(tiny_cross_encoder, monkeypatch):
    class Model:  # host_seconds as DynamicCrossEncoder reports it
        def host_seconds(self, pairs, batch_size):
            return 0.25 * len(pairs) / 10

    ticks = iter(range(100))
    monkeypatch.setattr(bu.time, "perf_counter", lambda: float(next(ticks)))  # each raw encode: 1 s
    ceiling = bu.host_ceiling([[("a", "b")] * 10, [("c", "d")] * 30], tiny_cross_encoder.tokenizer, 32, model=Model())
    assert ceiling.tokenizer_pairs_per_s == 40 / 2 and ceiling.host_pairs_per_s == 40 / 1.0
    assert bu.host_ceiling([[("a", "b")] * 4], tiny_cross_encoder.tokenizer, 32).host_pairs_per_s is None



def test_template_the_fast_path_cannot_see_falls_back(tokenizer):
    """A reference that adds a prompt (as CrossEncoder's chat template does for causal rerankers): the
    probe pairs differ, so every call goes to the reference and its ids come back exactly."""
    def with_prompt(pairs):
        return tokenizer([f"judge: {a}" for a, _ in pairs], [b for _, b in pairs], truncation="longest_first",
                         max_length=64, padding=True, return_tensors="np")

    host = PairTokenizer(tokenizer, 64, reference=with_prompt)
    assert "differ from CrossEncoder's on probe pairs" in host.describe()
    pairs = [("lorem ipsum", "dolor"), ("", " ".join(data.SENTENCES[:20]))]
    want = with_prompt(pairs)
    assert as_lists(host.encode(pairs)) == [row[m.astype(bool)].tolist() for row, m in zip(want["input_ids"], want["attention_mask"])]
