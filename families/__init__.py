"""Model families: what each reranker architecture needs to be scored exactly, one small file each.

A family says, for a loaded sentence-transformers CrossEncoder:

* which token of each sequence its head reads (`pool`: "first", "last", "last_non_pad", "mean"),
* the head itself: (seqs, hidden) pooled states -> (seqs, labels) logits, with the model's own weights,
* whether the model takes token types, and where its positions start (RoBERTa: padding_idx + 1),
* whether the padding-free path can run it, or why not.

Both paths run the transformers base model (`model.base_model`) with the library's own code: padded
with an attention mask, packed with `cu_seq_lens_*` through an attention function registered in
transformers' AttentionInterface (packing.py). The family's head then reads the pooled rows, so no
full-vocabulary projection and no classification head ever runs on padding.

`family_of(cross_encoder)` picks the family once; the class never branches on a model type. Adding a
family is a file here with a `FAMILY` and its tests.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

POOLS = ("first", "last", "last_non_pad", "mean")
# transformers model types whose position ids start at padding_idx + 1 for every sequence
ROBERTA_POSITION_TYPES = ("xlm-roberta", "roberta", "camembert", "xlm-roberta-xl")


class UnsupportedModelError(ValueError):
    """The class cannot score this model exactly; raised when it is built, never at predict time."""


def _no_reason(ce) -> str | None:
    return None


def default_position_offset(config) -> int:
    """First position id of every sequence: padding_idx + 1 for RoBERTa-style models, else 0."""
    return (config.pad_token_id or 0) + 1 if config.model_type in ROBERTA_POSITION_TYPES else 0


@dataclass(frozen=True)
class Family:
    """One reranker family. Every callable takes the loaded CrossEncoder (`ce`)."""

    name: str
    examples: str  # checkpoints of this family, for the README and errors
    model_types: tuple[str, ...]  # config.model_type values it serves (empty: matched by modules)
    pool: Callable[[object], str]  # ce -> one of POOLS
    head: Callable[[object, object], object]  # (ce, pooled (seqs, hidden)) -> logits (seqs, labels)
    packed_reason: Callable[[object], str | None] = _no_reason  # ce -> why the packed path cannot run it
    base: Callable[[object], object] = lambda ce: ce.model.base_model  # the encoder the library runs
    unsupported: Callable[[object], str | None] = _no_reason  # ce -> why this family cannot score it at all

    def check(self, ce) -> None:
        if self.pool(ce) not in POOLS:
            raise UnsupportedModelError(f"{self.name}: pooling {self.pool(ce)!r} is not one of {POOLS}")


def _families() -> list[Family]:
    from families import bert, causal_lm, deberta_v2, distilbert, electra, modernbert, qwen, roberta, st_modules

    return [m.FAMILY for m in (bert, electra, distilbert, roberta, modernbert, deberta_v2, qwen, causal_lm, st_modules)]


def _tail(ce) -> list:
    """The sentence-transformers modules after the Transformer (LogitScore, Pooling, Dense, ...)."""
    return list(ce)[1:]


def family_of(ce) -> Family:
    """The family that scores this CrossEncoder exactly; UnsupportedModelError naming the architecture
    and what is missing otherwise."""
    from families import causal_lm, st_modules

    arch = (getattr(ce.model.config, "architectures", None) or [type(ce.model).__name__])[0]
    if tail := _tail(ce):
        family = causal_lm.FAMILY if causal_lm.matches(tail) else st_modules.FAMILY
    else:
        model_type = ce.model.config.model_type
        found = [f for f in _families() if model_type in f.model_types]
        if not found:
            known = sorted(t for f in _families() for t in f.model_types)
            raise UnsupportedModelError(f"{arch} (model_type {model_type!r}) is not supported: no family for it "
                                        f"(supported model types: {', '.join(known)})")
        family = found[0]
    if why := family.unsupported(ce):
        modules = f" with sentence-transformers modules {[type(m).__name__ for m in tail]}" if tail else ""
        raise UnsupportedModelError(f"{arch}{modules} is not supported ({family.name}): {why}")
    family.check(ce)
    return family


def describe_family(family: Family, pool: str, token_types: bool) -> str:
    reads = {"first": "token 0", "last": "the last token", "last_non_pad": "the last non-pad token",
             "mean": "the mean of the tokens"}[pool]
    return f"{family.name}, head reads {reads}" + (", token types" if token_types else "")


def uses_token_types(ce) -> bool:
    """True when CrossEncoder feeds token_type_ids to the model (the tokenizer returns them and the
    model has more than one type): BERT, ELECTRA; dropping them changes every score."""
    names = getattr(ce.tokenizer, "model_input_names", []) or []
    return "token_type_ids" in names and (getattr(ce.model.config, "type_vocab_size", 0) or 0) > 0


def library_attention_reason(ce) -> str | None:
    """Why transformers' own modeling code cannot take packed inputs for this model, or None."""
    base = ce.model.base_model
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} does not dispatch through transformers' attention interface"
    return None


# ---- the compiled boundary: the library's base model, then the family's pooling and head ----------

_TAKES_USE_CACHE: dict = {}  # base model class -> its forward takes use_cache (a dict lookup compiles)


def _no_cache(base) -> dict:
    """use_cache=False for a forward that takes it: decoders (Qwen) default it to their config's True and
    would copy every layer's keys and values into a cache nothing reads. Others get nothing."""
    cls = type(base)
    if cls not in _TAKES_USE_CACHE:
        _TAKES_USE_CACHE[cls] = "use_cache" in inspect.signature(cls.forward).parameters
    return {"use_cache": False} if _TAKES_USE_CACHE[cls] else {}


def padded_logits(ce, family: Family, kind: str, token_types: bool, input_ids, attention_mask, token_type_ids, index):
    """(n, width) ids, mask, types; index (n,) -> (n, labels) float32: the base model with its own
    attention and mask, then the family's head on the pooled rows."""
    from packing import pool

    base = family.base(ce)
    kw = {"token_type_ids": token_type_ids} if token_types else {}
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, **kw, **_no_cache(base)).last_hidden_state
    n, width = input_ids.shape
    rows = torch.arange(n, device=input_ids.device)[:, None]
    seq_ids = torch.where(attention_mask.bool(), rows, n).flatten()
    pooled = pool(hidden.reshape(n * width, -1), kind, index, seq_ids, attention_mask.sum(1))
    return family.head(ce, pooled).float()


def packed_logits(ce, family: Family, kind: str, token_types: bool, input_ids, positions, types, seq_ids, slots,
                  cu_seqlens, index, cells, max_seqlen: int):
    """A packed batch's device args (packing.PackedBatch) -> (max_seqs, labels) float32: the base model's
    own code on a (1, tokens) input, its attention through the registered packed function (packing.py)."""
    from packing import pool

    base = family.base(ce)
    kw = {"token_type_ids": types[None]} if token_types else {}
    hidden = base(
        input_ids=input_ids[None], position_ids=positions[None], cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
        max_length_q=max_seqlen, max_length_k=max_seqlen, packed_slots=slots, packed_cells=cells, **kw, **_no_cache(base),
    ).last_hidden_state[0]
    seqs = index.shape[0]
    pooled = pool(hidden, kind, index, seq_ids, cu_seqlens[1 : seqs + 1] - cu_seqlens[:seqs])
    return family.head(ce, pooled).float()
