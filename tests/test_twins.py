"""The offline twin of every family (twins.py): each loads in a plain CrossEncoder, tokenizes a
pair with the family's real tokenizer class, template and token types, and scores vary across
inputs, so parity tests on the twins can fail. Tiny twins only, each built once per session."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import (BertTokenizer, DebertaV2Tokenizer, DistilBertTokenizer, Qwen2Tokenizer,
                          TokenizersBackend, XLMRobertaTokenizer)

import models
import twins

FAMILIES = list(models.FAMILY_TWINS)
# The class AutoTokenizer (and so CrossEncoder) gives each family's real checkpoints. ELECTRA's is
# BertTokenizer in transformers 5; ModernBERT checkpoints name PreTrainedTokenizerFast, which is
# TokenizersBackend there.
TOKENIZER_CLASS = {
    "xlm-roberta": XLMRobertaTokenizer, "bert": BertTokenizer, "electra": BertTokenizer,
    "distilbert": DistilBertTokenizer, "roberta-8k": XLMRobertaTokenizer, "modernbert": TokenizersBackend,
    "modernbert-cls": TokenizersBackend, "deberta-v2": DebertaV2Tokenizer, "qwen3-seq-cls": Qwen2Tokenizer,
    "qwen3-reranker": Qwen2Tokenizer, "bert-dense": BertTokenizer,
}
# (query, document) -> the tokens CrossEncoder feeds the model, and their token types (None: the
# tokenizer returns none, as the family's does). Literal: a change in a twin's tokenizer shows here.
PAIR = ("Lorem ipsum", "dolor sit")
_WORDPIECE = (["[CLS]", "l", "##or", "##em", "ipsum", "[SEP]", "dolor", "s", "##it", "[SEP]"],
              [0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
_XLMR = (["<s>", "\u2581", "L", "o", "r", "e", "m", "\u2581ipsum", "</s>", "</s>", "\u2581dolor", "\u2581sit", "</s>"],
         None)
_MODERNBERT = (["[CLS]", "L", "or", "em", "\u0120ipsum", "[SEP]", "d", "olor", "\u0120s", "it", "[SEP]"], None)
PAIR_TOKENS = {
    "xlm-roberta": _XLMR, "roberta-8k": _XLMR, "bert": _WORDPIECE, "electra": _WORDPIECE, "bert-dense": _WORDPIECE,
    "distilbert": (_WORDPIECE[0], None), "modernbert": _MODERNBERT, "modernbert-cls": _MODERNBERT,
    "deberta-v2": (["[CLS]", "\u2581L", "orem", "\u2581ipsum", "[SEP]", "\u2581dolor", "\u2581sit", "[SEP]"],
                   [0, 0, 0, 0, 0, 1, 1, 1]),
}
# Qwen3-Reranker's prompt for a pair, as its model card builds it by hand
QWEN3_PROMPT = ("<|im_start|>system\n" + twins.QWEN3_SYSTEM + "<|im_end|>\n<|im_start|>user\n<Instruct>: "
                + twins.QWEN3_INSTRUCTION + "\n<Query>: {q}\n<Document>: {d}<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n")
# Parity tests compare at 1e-5; a spread of 0.05 across 16 inputs means a wrong input (dropped token
# types, the wrong last token, the wrong pooling) moves scores by far more than that tolerance.
MIN_SCORE_STD = 0.05


def _pairs(n=16):
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    return [(" ".join(words[i % 5:i % 5 + 3]), " ".join(words[(3 * i) % 7:]) * (1 + i % 3)) for i in range(n)]


def _raw_scores(ce, pairs):
    return ce.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=len(pairs))


@pytest.mark.parametrize("family", FAMILIES)
def test_twin_loads_with_the_family_tokenizer_and_scores_vary(family, family_cross_encoder):
    ce = family_cross_encoder(family)
    assert type(ce.tokenizer) is TOKENIZER_CLASS[family]
    assert type(ce.model).__name__ == models.FAMILY_TWINS[family].architecture
    assert ce.num_labels == 1
    scores = _raw_scores(ce, _pairs())
    assert scores.shape == (16,) and np.isfinite(scores).all()
    assert scores.std() > MIN_SCORE_STD, scores
    ranked = ce.rank("lorem ipsum", [d for _, d in _pairs(5)])
    assert sorted(r["corpus_id"] for r in ranked) == list(range(5))
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in PAIR_TOKENS])
def test_pair_template_and_token_types(family, family_cross_encoder):
    ce = family_cross_encoder(family)
    features = ce[0].preprocess([PAIR])  # what CrossEncoder.predict feeds the model
    tokens, types = PAIR_TOKENS[family]
    assert ce.tokenizer.convert_ids_to_tokens(features["input_ids"][0]) == tokens
    if types is None:
        assert "token_type_ids" not in features
    else:
        assert features["token_type_ids"][0].tolist() == types


@pytest.mark.parametrize("family", ["bert", "electra", "bert-dense"])
def test_token_types_change_the_score(family, family_cross_encoder):
    """A path that drops token types must fail a parity test on these twins."""
    ce = family_cross_encoder(family)
    features = ce[0].preprocess(_pairs(8))
    features.pop("modality")
    with torch.no_grad():
        right = ce(dict(features))["scores"]
        zeroed = ce({**features, "token_type_ids": torch.zeros_like(features["token_type_ids"])})["scores"]
    assert (right - zeroed).abs().max() > 100 * 1e-5, (right, zeroed)


@pytest.mark.parametrize("family", ["qwen3-seq-cls", "qwen3-reranker"])
def test_qwen3_pairs_render_the_reranker_prompt(family, family_cross_encoder):
    ce = family_cross_encoder(family)
    pairs = [("q one", "a document"), ("a longer query here", "doc")]
    features = ce[0].preprocess(pairs)
    mask = features["attention_mask"].bool()
    for row, (q, d) in enumerate(pairs):
        text = ce.tokenizer.decode(features["input_ids"][row][mask[row]])
        assert text == QWEN3_PROMPT.format(q=q, d=d)
    assert mask[0].tolist() != mask[1].tolist()  # the two lengths differ: padding shows
    # pad token: the sequence classifier finds the last real token by it
    assert ce.model.config.pad_token_id == ce.tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_qwen3_reranker_is_a_causal_lm_scored_by_yes_minus_no(family_cross_encoder):
    from sentence_transformers.cross_encoder.modules import LogitScore

    ce = family_cross_encoder("qwen3-reranker")
    assert type(ce.model).__name__ == "Qwen3ForCausalLM"
    head = ce[1]
    assert isinstance(head, LogitScore)
    yes, no = (ce.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    assert (head.true_token_id, head.false_token_id) == (yes, no)
    assert ce.tokenizer.tokenize("yes") == ["yes"] and ce.tokenizer.tokenize("no") == ["no"]
    pairs = _pairs(4)
    features = ce[0].preprocess(pairs)
    assert features["attention_mask"][:, -1].all() and not features["attention_mask"][:, 0].all()  # left padded
    with torch.no_grad():  # the reference: the full LM's last-position logits, yes minus no
        logits = ce.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).logits[:, -1]
    np.testing.assert_allclose(_raw_scores(ce, pairs), (logits[:, yes] - logits[:, no]).numpy(), atol=1e-5)


def test_dense_head_twin_modules(family_twin_dir, family_cross_encoder):
    from sentence_transformers.base.modules import Dense

    modules = json.load(open(os.path.join(family_twin_dir("bert-dense"), "modules.json")))
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Dense"]
    ce = family_cross_encoder("bert-dense")
    assert ce[0].transformer_task == "feature-extraction" and ce[1].pooling_mode == "mean"
    assert isinstance(ce[3], Dense) and ce[3].module_output_name == "scores" and ce[3].out_features == 1


@pytest.mark.parametrize("family, pooling", [("modernbert", "mean"), ("modernbert-cls", "cls")])
def test_modernbert_twins_local_window_changes_the_score(family, pooling, family_cross_encoder):
    """A path that ignores the local window must fail a parity test on these twins."""
    from transformers import AutoModelForSequenceClassification

    ce = family_cross_encoder(family)
    config = ce.model.config
    assert config.classifier_pooling == pooling and config.local_attention == 16
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert models.FAMILY_TWINS[family].extra["local_attention"] == 128  # full size: the real models' window
    features = ce[0].preprocess(_pairs(8))
    assert features["attention_mask"].sum(1).min() > config.local_attention  # every pair is cut by the window
    inputs = {k: features[k] for k in ("input_ids", "attention_mask")}
    unwindowed = AutoModelForSequenceClassification.from_pretrained(
        ce.model.name_or_path, local_attention=4096, dtype=torch.float32)
    with torch.no_grad():
        windowed, full = ce.model(**inputs).logits, unwindowed(**inputs).logits
    assert (windowed - full).abs().max() > 100 * 1e-5, (windowed, full)


@pytest.mark.parametrize("family, dims, params", [
    # parameter counts of the mirrored checkpoints (tied embeddings counted once)
    ("bert", dict(hidden_size=384, num_hidden_layers=6, vocab_size=30522, type_vocab_size=2), 22.7e6),
    ("electra", dict(hidden_size=768, num_hidden_layers=12, type_vocab_size=2), 109.5e6),
    ("distilbert", dict(dim=768, n_layers=6), 67.0e6),
    ("roberta-8k", dict(hidden_size=768, max_position_embeddings=8194), 284.0e6),
    ("modernbert", dict(hidden_size=768, num_hidden_layers=22, vocab_size=50368, classifier_pooling="mean"), 149.6e6),
    ("deberta-v2", dict(hidden_size=768, vocab_size=128100, relative_attention=True, type_vocab_size=0), 184.4e6),
    ("qwen3-reranker", dict(hidden_size=1024, num_hidden_layers=28, vocab_size=151669), 596.0e6),
    ("qwen3-seq-cls", dict(hidden_size=1024, num_key_value_heads=8, head_dim=128), 596.0e6),
])
def test_full_size_configs_mirror_the_checkpoints(family, dims, params):
    import transformers

    tokenizer = twins._tokenizer(family)
    config = twins._config(family, "full", tokenizer, torch.float32)
    assert {k: getattr(config, k) for k in dims} == dims
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01, n


def test_xlm_roberta_spec_describes_the_reference_twin(tiny_model_dir):
    spec = models.FAMILY_TWINS["xlm-roberta"]
    config = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    assert {k: config[k] for k in spec.tiny} == spec.tiny
    full = {k: v for k, v in models.SIZES["full"].items() if k != "initializer_range"}
    assert {k: spec.full[k] for k in full} == full


def test_tokenizer_training_is_deterministic():
    for family in ("bert", "deberta-v2", "modernbert", "qwen3-reranker"):
        first, second = twins._tokenizer(family), twins._tokenizer(family)
        assert first.get_vocab() == second.get_vocab(), family
        assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str(), family


# ---- names ----

@pytest.mark.parametrize("name, family, size", [
    ("synthetic-bert-tiny", "bert", "tiny"), ("synthetic-qwen3-reranker", "qwen3-reranker", "full"),
    ("synthetic", "xlm-roberta", "full"), ("synthetic-tiny", "xlm-roberta", "tiny"),
    ("synthetic-modernbert-cls-tiny", "modernbert-cls", "tiny"), ("synthetic-xlm-roberta-tiny", "xlm-roberta", "tiny"),
])
def test_parse_twin_names(name, family, size):
    assert twins.parse_twin_name(name) == (family, size)


def test_resolve_and_source_of_family_twins(family_twin_dir, tiny_model_dir):
    path = models.resolve_model("synthetic-distilbert-tiny")
    assert path == family_twin_dir("distilbert")
    assert models.model_source(path) == "random-weight synthetic twin (distilbert, tiny, seed 0)"
    assert models.resolve_model("synthetic-xlm-roberta-tiny") == tiny_model_dir == family_twin_dir("xlm-roberta")
    assert models.model_source(tiny_model_dir) == "random-weight synthetic twin (tiny, seed 0)"


@pytest.mark.parametrize("name", ["synthetic-bart", "synthetic-", "synthetic-bert-tiny-tiny", "synthetic-BERT"])
def test_unknown_twin_names_list_the_choices(name):
    with pytest.raises(models.ModelNotFoundError, match=f"unknown synthetic model '{name}'.*synthetic-bert-tiny"):
        models.resolve_model(name)


def test_bad_family_and_size_name_the_argument():
    with pytest.raises(ValueError, match="family must be one of xlm-roberta, bert.*got 'gpt2'"):
        models.family_twin_dir("gpt2")
    with pytest.raises(ValueError, match="size must be one of full, tiny, got 'huge'"):
        models.family_twin_dir("bert", "huge")


def test_cli_builds_a_family_twin(family_twin_dir, capsys):
    models.main(["build-synthetic", "tiny", "--family", "electra"])
    assert capsys.readouterr().out.strip() == family_twin_dir("electra")
    with pytest.raises(SystemExit) as exit_:
        models.main(["build-synthetic", "tiny", "--family", "gpt2"])
    assert exit_.value.code == 2 and "invalid choice: 'gpt2'" in capsys.readouterr().err


def test_twin_is_built_once_and_rebuilt_when_incomplete(model_cache):
    path = models.family_twin_dir("bert", "tiny", seed=3)
    weights = os.path.join(path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert models.family_twin_dir("bert", "tiny", seed=3) == path and os.stat(weights).st_mtime_ns == stamp
    os.remove(os.path.join(path, models.SYNTHETIC_MARKER))  # an interrupted build
    assert models.family_twin_dir("bert", "tiny", seed=3) == path and models.is_synthetic(path)
    first = models.family_twin_dir("bert", "tiny")
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(first, "model.safetensors")), load_file(weights)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # the seed matters


def test_full_size_bert_twin_builds_and_scores(tmp_path):
    """The smallest full-size twin (22.7M parameters) end to end; the others share its code."""
    from sentence_transformers import CrossEncoder

    path = twins.build_family_twin(tmp_path / "bert-full", "bert", "full")
    config = json.load(open(os.path.join(path, "config.json")))
    assert (config["hidden_size"], config["num_hidden_layers"], config["dtype"]) == (384, 6, "float32")
    ce = CrossEncoder(path, device="cpu", local_files_only=True)
    assert _raw_scores(ce, _pairs()).std() > MIN_SCORE_STD
    assert models.model_source(path) == "random-weight synthetic twin (bert, full, seed 0)"
