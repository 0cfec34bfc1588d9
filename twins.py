"""Offline twins of every reranker family CrossEncoder 6 loads: seeded random weights in the
family's real architecture and sizes, a tokenizer of the family's real transformers class
trained on data.SENTENCES, the family's pair template and token types.

Their scores are meaningless, their timings and code paths are the real ones: every family
can be benchmarked and tested without the hub. models.py resolves `synthetic-<family>` and
`synthetic-<family>-tiny` to these directories; the "xlm-roberta" twin is models.synthetic_dir.
"""

import json
import os
import shutil
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

TWIN_FORMAT = 6  # bump when a family twin's recipe changes, so cached twins rebuild
TOKENIZER_VOCAB_SIZE = 400  # trained pieces: lorem-ipsum words split ~1.4 pieces per word
# Tiny twins: 2 layers, hidden 64, fp32. Their initializer ranges (and the full ones) are
# larger than the trained models' 0.02 so that logits vary across inputs (see models.SIZES):
# with 0.02 every pair gets nearly the same score and a parity test would prove nothing.
# Seen on 16 short pairs, fp32 on a CPU: std of the raw logits 0.3-2.7 tiny (tests/test_twins.py
# asserts > 0.05), 0.13 (modernbert-cls) to 2.5 (bert-dense) full; bf16 moves full-size logits by
# 5-33% of that spread (distilbert 0.013 of 0.25, roberta-8k 0.059 of 0.26, modernbert-cls 0.043 of
# 0.13, qwen3-reranker 0.21 of 1.67), as random networks amplify rounding.
# TINY_INIT 0.15 keeps tiny logits within about +-8: larger ranges amplify fp32 rounding past 1e-5 in
# CrossEncoder itself (its scores moved by 1.3e-5 between batch sizes 8 and 1 at 0.3).
TINY_INIT = 0.15
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4: [PAD] must be 0 (BertConfig)

# Qwen3-Reranker's prompt (its model card's format_queries / format_document), written as a chat
# template over the query/document roles CrossEncoder 6 gives a pair, as its ST 6 conversions ship.
QWEN3_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
                'provided. Note that the answer can only be "yes" or "no".')
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_CHAT_TEMPLATE = (
    "{%- macro text(m) -%}{%- if m.content is string -%}{{ m.content }}{%- else -%}"
    "{%- for c in m.content -%}{%- if c.type == 'text' -%}{{ c.text }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- set q = messages | selectattr('role', 'eq', 'query') | list -%}"
    "{%- set d = messages | selectattr('role', 'eq', 'document') | list -%}"
    "{%- if q and d -%}"
    "<|im_start|>system\n" + QWEN3_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {{ instruction | default('" + QWEN3_INSTRUCTION + "') }}\n"
    "<Query>: {{ text(q[0]) }}\n<Document>: {{ text(d[0]) }}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    "{% else -%}"  # no "-" before "else": the prompt's closing blank line stays
    "{%- for m in messages -%}<|im_start|>{{ m.role }}\n{{ text(m) }}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}"
    "{%- endif -%}")
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_THINK = ["<think>", "</think>"]  # added, not special: Qwen3 tokenizes them as plain added tokens


@dataclass(frozen=True)
class FamilyTwin:
    """One family's twin: the architecture, the checkpoints it mirrors, config dims per size."""
    architecture: str  # the transformers class of the weights
    mirrors: tuple[str, ...]
    tokenizer: str  # the transformers class and the pair template it applies
    full: dict  # config overrides at the mirrored model's sizes
    tiny: dict  # config overrides for tests
    full_dtype: str = "float32"  # what the mirrored checkpoint ships
    note: str = ""
    extra: dict = field(default_factory=dict)  # config fields common to both sizes


_BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=3072, vocab_size=151669, initializer_range=0.05)
_QWEN3_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=1024, initializer_range=TINY_INIT)
_QWEN3_EXTRA = dict(max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)

FAMILY_TWINS: "OrderedDict[str, FamilyTwin]" = OrderedDict([
    ("xlm-roberta", FamilyTwin(
        "XLMRobertaForSequenceClassification", ("jinaai/jina-reranker-v2-base-multilingual",),
        "XLMRobertaTokenizer (Unigram): <s> A </s></s> B </s>, no token types",
        full=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  vocab_size=250002, max_position_embeddings=1026),
        tiny=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  vocab_size=1024, max_position_embeddings=1026),
        full_dtype="bfloat16", note="models.synthetic_dir: the benchmark's reference twin, its own cache path")),
    ("bert", FamilyTwin(
        "BertForSequenceClassification",
        ("cross-encoder/ms-marco-MiniLM-L6-v2", "cross-encoder/ms-marco-MiniLM-L12-v2", "BAAI/bge-reranker-base"),
        "BertTokenizer (WordPiece, lowercase): [CLS] A [SEP] B [SEP], token types 0 then 1",
        full=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                  vocab_size=30522, initializer_range=0.1),
        tiny=dict(_TINY, vocab_size=1024, initializer_range=TINY_INIT),
        extra=dict(max_position_embeddings=512, type_vocab_size=2))),
    ("electra", FamilyTwin(
        "ElectraForSequenceClassification", ("cross-encoder/ms-marco-electra-base",),
        "ElectraTokenizer (= BertTokenizer, WordPiece): [CLS] A [SEP] B [SEP], token types 0 then 1",
        full=dict(_BERT_BASE, embedding_size=768, vocab_size=30522, initializer_range=0.05),
        tiny=dict(_TINY, embedding_size=64, vocab_size=1024, initializer_range=TINY_INIT),
        extra=dict(max_position_embeddings=512, type_vocab_size=2))),
    ("distilbert", FamilyTwin(
        "DistilBertForSequenceClassification",
        ("distilbert/distilbert-base-uncased fine-tuned as a cross-encoder (sentence-transformers training scripts)",),
        "DistilBertTokenizer (WordPiece): [CLS] A [SEP] B [SEP], no token_type_ids returned",
        full=dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072, vocab_size=30522, initializer_range=0.05),
        tiny=dict(dim=64, n_layers=2, n_heads=2, hidden_dim=128, vocab_size=1024, initializer_range=TINY_INIT),
        extra=dict(max_position_embeddings=512))),
    ("roberta-8k", FamilyTwin(
        "XLMRobertaForSequenceClassification", ("BAAI/bge-reranker-v2-m3",),
        "XLMRobertaTokenizer (Unigram): <s> A </s></s> B </s>, no token types",
        full=dict(_BERT_BASE, vocab_size=250002, initializer_range=0.08),
        tiny=dict(_TINY, vocab_size=1024, initializer_range=TINY_INIT),
        extra=dict(max_position_embeddings=8194, type_vocab_size=1, layer_norm_eps=1e-5),
        note="full size keeps the real 8194 positions and vocabulary but base dims (768 x 12 layers, not "
             "bge-reranker-v2-m3's 1024 x 24) so it builds and runs on a small machine")),
    ("modernbert", FamilyTwin(
        "ModernBertForSequenceClassification", ("Alibaba-NLP/gte-reranker-modernbert-base",),
        "PreTrainedTokenizerFast (byte-level BPE): [CLS] A [SEP] B [SEP], no token_type_ids returned",
        full=dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                  vocab_size=50368, initializer_range=0.05),
        tiny=dict(_TINY, num_hidden_layers=3, vocab_size=1024, initializer_range=TINY_INIT, local_attention=16),
        extra=dict(max_position_embeddings=8192, local_attention=128, global_attn_every_n_layers=3,
                   classifier_pooling="mean"),
        note="tiny: 3 layers, a global (0) and two local ones (1, 2), with a 16-token window, so the window "
             "cuts into the short pairs tests use")),
    ("modernbert-cls", FamilyTwin(
        "ModernBertForSequenceClassification", ("jhu-clsp/ettin-encoder-150m rerankers", "ibm-granite/granite-embedding-reranker-english-r2"),
        "PreTrainedTokenizerFast (byte-level BPE): [CLS] A [SEP] B [SEP], no token_type_ids returned",
        full=dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                  vocab_size=50368, initializer_range=0.05),
        tiny=dict(_TINY, num_hidden_layers=3, vocab_size=1024, initializer_range=TINY_INIT, local_attention=16),
        extra=dict(max_position_embeddings=8192, local_attention=128, global_attn_every_n_layers=3,
                   classifier_pooling="cls"))),
    ("deberta-v2", FamilyTwin(
        "DebertaV2ForSequenceClassification", ("mixedbread-ai/mxbai-rerank-base-v1",),
        "DebertaV2Tokenizer (Unigram): [CLS] A [SEP] B [SEP], token types 0 then 1 (the model has none: "
        "type_vocab_size 0)",
        full=dict(_BERT_BASE, vocab_size=128100, initializer_range=0.05),
        tiny=dict(_TINY, vocab_size=1024, initializer_range=TINY_INIT),
        extra=dict(max_position_embeddings=512, type_vocab_size=0, relative_attention=True, position_buckets=256,
                   pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
                   norm_rel_ebd="layer_norm", share_att_key=True, layer_norm_eps=1e-7))),
    ("qwen3-seq-cls", FamilyTwin(
        "Qwen3ForSequenceClassification", ("tomaarsen/Qwen3-Reranker-0.6B-seq-cls",),
        "Qwen2Tokenizer (byte-level BPE) with Qwen3-Reranker's chat template over the query/document roles",
        full=_QWEN3_06B, tiny=_QWEN3_TINY, full_dtype="bfloat16", extra=_QWEN3_EXTRA,
        note="pad_token_id is <|endoftext|>, so the head finds the last non-pad token")),
    ("qwen3-reranker", FamilyTwin(
        "Qwen3ForCausalLM", ("Qwen/Qwen3-Reranker-0.6B",),
        "Qwen2Tokenizer (byte-level BPE), single-token 'yes' / 'no', Qwen3-Reranker's chat template; "
        "CrossEncoder 6 adds LogitScore(yes, no) and pads left",
        full=_QWEN3_06B, tiny=_QWEN3_TINY, full_dtype="bfloat16", extra=_QWEN3_EXTRA)),
    ("bert-dense", FamilyTwin(
        "BertModel",
        ("CrossEncoder saved by sentence-transformers 6 with a pooling and dense head after a feature-extraction "
         "Transformer",),
        "BertTokenizer (WordPiece, lowercase): [CLS] A [SEP] B [SEP], token types 0 then 1",
        full=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                  vocab_size=30522, initializer_range=0.05),
        tiny=dict(_TINY, vocab_size=1024, initializer_range=TINY_INIT),
        extra=dict(max_position_embeddings=512, type_vocab_size=2),
        note="modules.json: Transformer (feature-extraction), Pooling, Dense, Dense(module_output_name='scores')")),
])
SIZE_NAMES = ("full", "tiny")


def check_family(family: str) -> FamilyTwin:
    if family not in FAMILY_TWINS:
        raise ValueError(f"family must be one of {', '.join(FAMILY_TWINS)}, got {family!r}")
    return FAMILY_TWINS[family]


def check_size(size: str) -> None:
    if size not in SIZE_NAMES:
        raise ValueError(f"size must be one of {', '.join(SIZE_NAMES)}, got {size!r}")


# ---- tokenizers: the family's own transformers class, its vocabulary trained offline ----

def _corpus(extra=()) -> list[str]:
    from data import SENTENCES

    return list(SENTENCES) + list(extra)


def _wordpiece_tokenizer(cls):
    """BertTokenizer / DistilBertTokenizer: the class's own normalizer and pre-tokenizer,
    WordPiece vocabulary trained on data.SENTENCES, specials at ids 0-4."""
    from tokenizers import trainers

    backend = cls()._tokenizer  # the class's pipeline, to train the vocabulary through
    # The trainer numbers "##x" pieces in hash-map order and breaks ties between equally frequent
    # merges by those numbers: different vocabularies from run to run. Every character and its
    # "##" form listed up front (ids in sorted order) makes the merges, and the twin, the same.
    chars = sorted({c for text in _corpus() for c in backend.normalizer.normalize_str(text) if not c.isspace()})
    backend.train_from_iterator(_corpus(), trainer=trainers.WordPieceTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=_BERT_SPECIALS + chars + ["##" + c for c in chars],
        show_progress=False))
    vocab = dict(sorted(backend.get_vocab().items(), key=lambda kv: kv[1]))
    assert list(vocab)[:5] == _BERT_SPECIALS
    return cls(vocab=vocab, model_max_length=512)


def _unigram_vocab(backend, specials: list[str], unk: str) -> list[tuple[str, float]]:
    """Unigram pieces trained through `backend`'s pipeline, deterministic (see models._train_tokenizer)."""
    from tokenizers import trainers

    backend.train_from_iterator(_corpus(), trainer=trainers.UnigramTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=specials, unk_token=unk, show_progress=False))
    vocab = [(piece, score) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    n = len(specials)
    assert [piece for piece, _ in vocab[:n]] == specials, vocab[:n]
    floor = min(score for piece, score in vocab[n:] if len(piece) > 1)
    fallback = {piece: score for piece, score in vocab[n:] if len(piece) == 1 and score < floor}
    pieces = [(p, round(min(fallback.values()), 4) if p in fallback else round(s, 6)) for p, s in vocab[n:]]
    return [(p, 0.0) for p in specials] + sorted(pieces, key=lambda ps: (-ps[1], ps[0]))


def _deberta_tokenizer():
    """DebertaV2Tokenizer: its own Metaspace pipeline, Unigram pieces; [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3."""
    from transformers import DebertaV2Tokenizer

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # deberta-v3's order ([MASK] moved down)
    vocab = _unigram_vocab(DebertaV2Tokenizer()._tokenizer, specials, "[UNK]")
    return DebertaV2Tokenizer(vocab=vocab, unk_id=3, model_max_length=512)


def _xlmr_8k_tokenizer():
    import models

    tokenizer = models._train_tokenizer()
    tokenizer.model_max_length = 8192  # as bge-reranker-v2-m3's tokenizer_config
    return tokenizer


def _modernbert_tokenizer():
    """A generic fast tokenizer, as ModernBERT checkpoints ship (tokenizer_class
    PreTrainedTokenizerFast): byte-level BPE, [CLS] A [SEP] B [SEP], ids and mask only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE + 256, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(  # ModernBERT's own post-processor
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"], model_max_length=8192)


def _qwen3_tokenizer():
    """Qwen2Tokenizer: its own regex + byte-level pipeline, BPE merges trained on data.SENTENCES
    and the reranker prompt; "yes" and "no" single tokens as in Qwen's vocabulary."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Qwen2Tokenizer()._tokenizer
    # standalone lines: the pre-tokenizer glues a leading quote or space to a word
    prompt = [QWEN3_SYSTEM, QWEN3_INSTRUCTION, "<Instruct>: <Query>: <Document>:"] + ["yes", "no"] * 200
    backend.train_from_iterator(_corpus(prompt), trainer=trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE + 256, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=40960,
                               errors="replace", split_special_tokens=False)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN3_SPECIALS[1:]})
    tokenizer.add_tokens(QWEN3_THINK)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    for word in ("yes", "no"):
        assert tokenizer.tokenize(word) == [word], (word, tokenizer.tokenize(word))
    return tokenizer


# ---- configs and weights ----

def _config(family: str, size: str, tokenizer, dtype):
    """The transformers config of `family` at `size`, special ids from the tokenizer."""
    import transformers

    spec = FAMILY_TWINS[family]
    dims = {**spec.extra, **(spec.full if size == "full" else spec.tiny)}
    assert len(tokenizer) <= dims["vocab_size"], (len(tokenizer), dims["vocab_size"])
    ids = dict(pad_token_id=tokenizer.pad_token_id)
    if family.startswith("modernbert"):
        ids.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                   bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    elif family.startswith("qwen3"):
        ids.update(bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    elif family == "roberta-8k":
        ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config_class = getattr(transformers, spec.architecture).config_class
    return config_class(**dims, **ids, num_labels=1, architectures=[spec.architecture], dtype=dtype)


def _seeded_model(config, seed: int, dtype):
    import transformers

    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG
        torch.manual_seed(seed)
        model = getattr(transformers, config.architectures[0])(config)
    return model.to(dtype)


def _tokenizer(family: str):
    from transformers import BertTokenizer, DistilBertTokenizer, ElectraTokenizer

    return {"bert": lambda: _wordpiece_tokenizer(BertTokenizer), "bert-dense": lambda: _wordpiece_tokenizer(BertTokenizer),
            "electra": lambda: _wordpiece_tokenizer(ElectraTokenizer),
            "distilbert": lambda: _wordpiece_tokenizer(DistilBertTokenizer),
            "roberta-8k": _xlmr_8k_tokenizer, "modernbert": _modernbert_tokenizer,
            "modernbert-cls": _modernbert_tokenizer, "deberta-v2": _deberta_tokenizer,
            "qwen3-seq-cls": _qwen3_tokenizer, "qwen3-reranker": _qwen3_tokenizer}[family]()


def _save_dense_cross_encoder(path: str, model, tokenizer, seed: int) -> None:
    """A CrossEncoder of modules Transformer(feature-extraction) -> Pooling(mean) -> Dense(tanh)
    -> Dense(hidden -> 1, "scores"), saved by CrossEncoder itself (modules.json, module configs)."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    backbone = os.path.join(path, ".backbone")
    model.save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    hidden, std = model.config.hidden_size, model.config.initializer_range
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        # Large enough that the tanh is neither flat nor saturated on mean-pooled states and the
        # scores spread across inputs (std 2-3 on 16 pairs), like the backbone's initializer_range.
        dense = Dense(hidden, hidden, activation_function=torch.nn.Tanh(),
                      init_weight=torch.randn(hidden, hidden) * std * 4, init_bias=torch.zeros(hidden))
        # scaled by 2 / sqrt(hidden): scores of std ~1 across inputs; a unit scale gave logits up to 8,
        # where fp32 rounding in CrossEncoder itself nears 1e-5
        score = Dense(hidden, 1, activation_function=None, init_weight=torch.randn(1, hidden) * 2 * hidden**-0.5,
                      init_bias=torch.zeros(1), module_output_name="scores")
    transformer = Transformer(backbone, transformer_task="feature-extraction", model_kwargs={"dtype": model.dtype})
    encoder = CrossEncoder(modules=[transformer, Pooling(hidden, "mean"), dense, score], device="cpu")
    encoder.save(path)
    shutil.rmtree(backbone)  # the Transformer module saved its own copy at the top level


def build_family_twin(path, family: str, size: str = "tiny", seed: int = 0) -> str:
    """Write `family`'s twin into `path`: config, seeded random weights (the mirrored model's dtype
    at full size, fp32 tiny), trained tokenizer; models.SYNTHETIC_MARKER last."""
    import models

    spec, path = check_family(family), str(path)
    check_size(size)
    if family == "xlm-roberta":
        return models.build_synthetic(path, size, seed)
    os.makedirs(path, exist_ok=True)
    tokenizer = _tokenizer(family)
    dtype = getattr(torch, spec.full_dtype) if size == "full" else torch.float32
    model = _seeded_model(_config(family, size, tokenizer, dtype), seed, dtype)
    if family == "bert-dense":
        _save_dense_cross_encoder(path, model, tokenizer, seed)
    else:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    with open(os.path.join(path, models.SYNTHETIC_MARKER), "w") as f:
        json.dump(_marker(family, size, seed), f)
    return path


def _marker(family: str, size: str, seed: int) -> dict:
    return {"family": family, "size": size, "seed": seed, "format": TWIN_FORMAT}


def family_twin_dir(family: str, size: str = "tiny", seed: int = 0) -> str:
    """The cached twin of `family` under models.cache_root(), built once, atomically."""
    import models

    check_family(family)
    check_size(size)
    if family == "xlm-roberta":
        return models.synthetic_dir(size, seed)
    final = os.path.join(models.cache_root(), f"twin-{family}-{size}-seed{seed}")

    def complete(p):
        return models._read_json(p, models.SYNTHETIC_MARKER) == _marker(family, size, seed)

    if not complete(final):
        print(f"building the {size} {family} synthetic twin in {final} (once)", file=sys.stderr)
    return models._build_atomically(final, lambda tmp: build_family_twin(tmp, family, size, seed), complete)


def twin_names() -> list[str]:
    """Every `--model` name that resolves to a twin: synthetic[-tiny], synthetic-<family>[-tiny]."""
    names = ["synthetic", "synthetic-tiny"]
    for family in FAMILY_TWINS:
        names += [f"synthetic-{family}", f"synthetic-{family}-tiny"]
    return names


def parse_twin_name(name: str) -> tuple[str, str] | None:
    """"synthetic-bert-tiny" -> ("bert", "tiny"); "synthetic" -> ("xlm-roberta", "full"); None when
    `name` is no synthetic name; ValueError naming the choices for an unknown family."""
    if name in ("synthetic", "synthetic-tiny"):
        return "xlm-roberta", "tiny" if name.endswith("-tiny") else "full"
    if not name.startswith("synthetic-"):
        return None
    rest = name[len("synthetic-"):]
    family, size = (rest[:-len("-tiny")], "tiny") if rest.endswith("-tiny") else (rest, "full")
    if family not in FAMILY_TWINS:
        raise ValueError(f"unknown synthetic model {name!r}: expected one of {', '.join(twin_names())}")
    return family, size
