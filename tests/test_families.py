"""Every reranker family scored exactly, on both paths, eager and compiled, against CrossEncoder.

Each family's tiny offline twin (twins.py: the family's real architecture, tokenizer class, pair
template and token types; random weights) is loaded twice: as the plain sentence-transformers
CrossEncoder (the reference, fp32) and as DynamicCrossEncoder. Hard pairs: empty texts, one word,
over-long texts truncated from either side, non-Latin scripts, duplicates, and a rerank query.
"""

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

import data
import twins
from dynamic_cross_encoder import DynamicCrossEncoder
from families import UnsupportedModelError, family_of

from helpers import EDGE_PAIRS, FP32, IDENTITY, LONG_TEXT, TOL, assert_same_logits

FAMILIES = [f for f in twins.FAMILY_TWINS if f != "xlm-roberta"]  # xlm-roberta: tests/test_packed.py and others
PADDED_ONLY = {"deberta-v2": "relative attention"}
NON_LATIN = [["Καλημέρα κόσμε", "こんにちは世界"], ["Привет мир", "مرحبا بالعالم"], ["नमस्ते", "😀🎉 lorem"]]
QUERY = "lorem ipsum dolor sit amet"


def hard_pairs() -> list[list[str]]:
    docs = data.load_pairs(6, seed=11, min_sentences=1, max_sentences=6)
    return data.load_pairs(14, seed=3, min_sentences=1, max_sentences=10) + EDGE_PAIRS + NON_LATIN + [
        [QUERY, d] for d, _ in docs]


@pytest.fixture(scope="module")
def pairs():
    return hard_pairs()


_CACHE: dict = {}


def reference_batch(family: str) -> int:
    """CrossEncoder pads causal rerankers on the left, which shifts every real token's rotary position
    by the padding: exact in arithmetic, not in fp32 (its own scores moved by 1.2-1.9e-5 between batch
    sizes 8 and 1 on the twin). One pair per batch has no padding: the model's own score of the pair."""
    return 1 if family == "qwen3-reranker" else 8


def reference(family: str, pairs):
    """(twin dir, CrossEncoder fp32, its logits on `pairs`), built once per family."""
    if family not in _CACHE:
        path = twins.family_twin_dir(family, "tiny")
        ce = CrossEncoder(path, device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32})
        _CACHE[family] = path, ce, ce.predict(pairs, activation_fn=IDENTITY, batch_size=reference_batch(family))
    return _CACHE[family]


def load(path, **kwargs):
    # fp32: the reference's precision (the CPU default may be bf16, tests/test_device_policy.py)
    kwargs.setdefault("packed", False)  # the padded path unless asked (the CPU's default is packed)
    return DynamicCrossEncoder(path, device="cpu", local_files_only=True, model_kwargs=FP32, **kwargs)


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_the_cpu_default_is_packed_where_the_family_takes_it(family, recwarn):
    """Not asked for, the path is the CPU's default (packed); a family that cannot take it runs padded
    without a warning, and describe() says why."""
    path = twins.family_twin_dir(family, "tiny")
    model = DynamicCrossEncoder(path, device="cpu", local_files_only=True, model_kwargs=FP32, compile=False)
    assert model.packed is (family not in PADDED_ONLY)
    described = model.describe()
    assert ("no packed path: " in described and PADDED_ONLY[family] in described) if family in PADDED_ONLY else (
        "packed, sdpa_padded" in described)
    assert not [w for w in recwarn if "packed" in str(w.message)]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_cross_encoder(family, packed, compile, pairs):
    path, ce, ref = reference(family, pairs)
    if packed and family in PADDED_ONLY:
        with pytest.warns(UserWarning, match=f"packed=True is not supported.*{PADDED_ONLY[family]}"):
            model = load(path, packed=True, compile=compile, max_tokens_per_batch=512)
        assert not model.packed and PADDED_ONLY[family] in model.describe()
    else:
        model = load(path, packed=packed, compile=compile, max_tokens_per_batch=512)
        assert model.packed is packed, "no silent fallback"
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ref)
    # a different batch size cuts other batches; the scores stay the reference's
    assert_same_logits(model.predict(pairs[::-1], activation_fn=IDENTITY, batch_size=3)[::-1], ref)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rank_order_equals_cross_encoder(family, packed, pairs):
    path, ce, _ = reference(family, pairs)
    docs = list(dict.fromkeys(b for _, b in pairs if b))[:16]  # distinct: duplicates tie exactly
    want = ce.rank(QUERY, docs, activation_fn=IDENTITY, batch_size=reference_batch(family))
    scores = np.array([r["score"] for r in want])
    model = load(path, packed=packed and family not in PADDED_ONLY, compile=False)
    got = model.rank(QUERY, docs, activation_fn=IDENTITY)
    # near-ties (within the tolerance) may swap; every other pair of documents keeps its order
    assert (-np.diff(scores) > 2 * TOL).sum() >= 10, "the reference barely orders the documents"
    by_id = {r["corpus_id"]: r["score"] for r in want}
    assert np.diff([by_id[r["corpus_id"]] for r in got]).max() <= 2 * TOL, "rank() order differs"
    np.testing.assert_allclose([r["score"] for r in got], [by_id[r["corpus_id"]] for r in got], rtol=0, atol=TOL)


@pytest.mark.parametrize("family", ["bert", "electra", "bert-dense"])
def test_token_types_are_the_tokenizers(family, pairs):
    """BERT-style families: type 0 for `[CLS] A [SEP]`, 1 for `B [SEP]`, through longest_first truncation,
    exactly as CrossEncoder's preprocess makes them; and the model receives them."""
    path, ce, _ = reference(family, pairs)
    model = load(path, compile=False)
    got = model._encode(pairs)
    want = ce.preprocess([list(p) for p in pairs])
    mask = want["attention_mask"].bool().numpy()
    assert model._pair_tokenizer().fallback_reason is None, "the fast path runs (it matched on the probe pairs)"
    assert got.types is not None and model.describe().endswith("each distinct text once, token types)")
    assert got.types.tolist() == want["token_type_ids"].numpy()[mask].tolist()
    assert got.flat.tolist() == want["input_ids"].numpy()[mask].tolist()
    assert set(got.types.tolist()) == {0, 1}


def test_token_types_change_bert_scores(pairs):
    """Dropping the token types (as the class did before families) moves every BERT score: the check
    above is what keeps them exact."""
    path, ce, ref = reference("bert", pairs)
    model = load(path, compile=False)
    model._token_types = False
    model._pairs_tok = None
    assert np.abs(model.predict(pairs, activation_fn=IDENTITY) - ref).max() > 100 * TOL


@pytest.mark.parametrize("family", ["distilbert", "modernbert", "qwen3-seq-cls"])
def test_families_without_token_types_get_none(family, pairs):
    path, *_ = reference(family, pairs)
    assert load(path, compile=False)._encode(pairs[:3]).types is None


def test_causal_reranker_applies_cross_encoders_prompt_template(pairs):
    """The yes/no reranker's chat template comes from CrossEncoder's preprocess: the host tokenizer
    says it falls back to it, and the ids equal CrossEncoder's, over-long pairs keeping the template's end."""
    path, *_ = reference("qwen3-reranker", pairs)
    ce = CrossEncoder(path, device="cpu", local_files_only=True, max_length=128)
    model = load(path, compile=False, max_length=128)
    assert "CrossEncoder's tokenization" in model.describe()
    want = ce.preprocess([list(p) for p in pairs])
    mask = want["attention_mask"].bool().numpy()
    got = model._encode(pairs)
    assert got.flat.tolist() == want["input_ids"].numpy()[mask].tolist()
    assert got.lengths.max() == 128, "over-long pairs are truncated to max_length"
    long = model._encode([[LONG_TEXT, LONG_TEXT]])
    end = ce.preprocess([["lorem", "ipsum"]])["input_ids"][0, -5:].tolist()  # the template's end
    assert long.flat[-5:].tolist() == end and long.lengths[0] == 128


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_causal_reranker_never_computes_the_vocabulary(packed, pairs, monkeypatch):
    """Only the true and false rows of the output projection are read: lm_head itself never runs."""
    path, _, ref = reference("qwen3-reranker", pairs)
    model = load(path, packed=packed, compile=False)
    calls = []
    monkeypatch.setattr(model.model.lm_head, "forward", lambda x: calls.append(x.shape) or x)
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ref)
    assert calls == []


def test_head_reads_the_right_token_per_family(pairs):
    path, *_ = reference("modernbert", pairs)
    assert load(path, compile=False)._pool == "mean"
    path, *_ = reference("modernbert-cls", pairs)
    assert load(path, compile=False)._pool == "first"
    path, *_ = reference("qwen3-seq-cls", pairs)
    assert load(path, compile=False)._pool == "last_non_pad"
    path, *_ = reference("qwen3-reranker", pairs)
    assert load(path, compile=False)._pool == "last"


# ---- what the class cannot score exactly is refused when it is built --------------------------


def test_unknown_architecture_is_refused(tmp_path, pairs):
    """An architecture no family covers (ALBERT) raises at construction, naming it."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    path, *_ = reference("bert", pairs)
    out = tmp_path / "albert"
    config = AlbertConfig(vocab_size=1024, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, num_labels=1)
    AlbertForSequenceClassification(config).save_pretrained(out)
    CrossEncoder(path, device="cpu", local_files_only=True).tokenizer.save_pretrained(out)
    with pytest.raises(UnsupportedModelError, match=r"AlbertForSequenceClassification \(model_type 'albert'\) is not supported"):
        load(str(out), compile=False)


def test_unsupported_sentence_transformers_head_is_refused(pairs, monkeypatch):
    """A Pooling mode the class does not reproduce (max) is named, not scored approximately."""
    path, ce, _ = reference("bert-dense", pairs)
    pooling = list(ce)[1]
    monkeypatch.setattr(pooling, "pooling_mode", "max")
    with pytest.raises(UnsupportedModelError, match="Pooling mode 'max'"):
        family_of(ce)
    assert isinstance(UnsupportedModelError("x"), ValueError)  # scripts turn it into a one-line error


# ---- decoders: no KV cache ---------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("family", ["qwen3-seq-cls", "qwen3-reranker", "modernbert", "bert"])
def test_no_kv_cache_is_built(family, packed, pairs, monkeypatch):
    """Qwen's forward takes use_cache from its config (True): every layer would copy its keys and values
    into a DynamicCache nothing reads (about 1.9 GB at 16k tokens for Qwen3-0.6B). Encoders whose forward
    has no use_cache (ModernBERT) are not given one."""
    import inspect

    from transformers import DynamicCache

    path, _, ref = reference(family, pairs)
    model = load(path, packed=packed, compile=False)
    base = model.family.base(model)
    built, given, init, forward = [], [], DynamicCache.__init__, base.forward
    monkeypatch.setattr(DynamicCache, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    monkeypatch.setattr(base, "forward", lambda *a, **k: given.append(k.get("use_cache", "not given")) or forward(*a, **k))
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ref)
    takes = "use_cache" in inspect.signature(type(base).forward).parameters
    assert takes is (family != "modernbert")
    assert given and set(given) == {False if takes else "not given"} and built == []


# ---- a generative reranker without a prompt template -------------------------------------------


@pytest.fixture(scope="module")
def causal_without_template(tmp_path_factory, pairs):
    """The yes/no reranker twin with its chat template removed: CrossEncoder formats a pair as the two
    texts, and an empty pair as no tokens at all."""
    import json
    import os
    import shutil

    path, *_ = reference("qwen3-reranker", pairs)
    out = tmp_path_factory.mktemp("qwen3-reranker-no-template") / "model"
    shutil.copytree(path, out)
    for name in [n for n in os.listdir(out) if "chat_template" in n]:
        os.remove(out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    ce = CrossEncoder(str(out), device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32})
    assert not ce.tokenizer.chat_template and [type(m).__name__ for m in ce] == ["Transformer", "LogitScore"]
    return str(out), ce


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_causal_reranker_without_a_template_scores_like_cross_encoder(causal_without_template, packed, pairs):
    """The tokenizer's start-up probe sends pairs to CrossEncoder's preprocess, which refuses the empty
    one for this model: the probe skips it instead of making the model unusable."""
    path, ce = causal_without_template
    usable = [p for p in pairs if p[0] or p[1]]
    assert len(usable) == len(pairs) - 1
    ref = ce.predict(usable, activation_fn=IDENTITY, batch_size=reference_batch("qwen3-reranker"))
    model = load(path, packed=packed, compile=False)
    assert model.describe().endswith("host: tokenizers backend, each distinct text once)"), "matched on the others"
    assert_same_logits(model.predict(usable, activation_fn=IDENTITY, batch_size=8), ref)
    want = ce.preprocess([list(p) for p in usable])
    got = model._encode(usable)
    assert got.flat.tolist() == want["input_ids"].numpy()[want["attention_mask"].bool().numpy()].tolist()


def test_an_empty_pair_is_refused_where_cross_encoder_refuses_it(causal_without_template, monkeypatch):
    """Such a model encodes ("", "") as no tokens; CrossEncoder cannot score it (alone: IndexError; in a
    batch: its left-padding check). The class raises a ValueError naming the pair, on every path: the
    fast tokenization, and CrossEncoder's where it runs (its refusal of the call is traced to the pair;
    a refusal for another reason comes through as it is)."""
    path, ce = causal_without_template
    with pytest.raises(IndexError):
        ce.predict([["", ""]])
    with pytest.raises(ValueError, match="left padding"):
        ce.predict([["lorem", "ipsum"], ["", ""]])
    model = load(path, compile=False)
    empty = r"\(\['', ''\]\) has no tokens: .* CrossEncoder cannot score it either"
    with pytest.raises(ValueError, match=r"inputs\[0\] " + empty):
        model.predict([["", ""]])
    many = [["lorem", "ipsum"]] * 300
    many[280] = ["", ""]  # in the second chunk the tokenizer encodes (pair_tokenizer.chunk_bounds)
    with pytest.raises(ValueError, match=r"inputs\[280\] " + empty):
        model.predict(many)
    with pytest.raises(ValueError, match=r"inputs\[1\] " + empty):
        model.encode_pairs([["lorem", ""], ["", ""]])
    tokenizer = model._pair_tokenizer()
    monkeypatch.setattr(tokenizer, "fallback_reason", "CrossEncoder's tokenization, asked for")
    with pytest.raises(ValueError, match=r"inputs\[280\] " + empty):
        model.predict(many)
    error = RuntimeError("refused for another reason")
    monkeypatch.setattr(tokenizer, "reference", lambda pairs: (_ for _ in ()).throw(error))
    with pytest.raises(RuntimeError) as raised:
        model.predict([["lorem", "ipsum"]])
    assert raised.value is error
