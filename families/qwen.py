"""Qwen2 / Qwen3 sequence classifiers: seq-cls conversions of Qwen3-Reranker. No token types;
rotary positions 0..; causal attention; the score layer on the last non-pad token (the last token
when the config has no pad token), as transformers' GenericForSequenceClassification does."""

from families import Family, library_attention_reason


def pool(ce) -> str:
    return "last" if ce.model.config.pad_token_id is None else "last_non_pad"


FAMILY = Family(
    name="Qwen2/Qwen3 seq-cls",
    examples="tomaarsen/Qwen3-Reranker-0.6B-seq-cls",
    model_types=("qwen2", "qwen3"),
    pool=pool,
    head=lambda ce, pooled: ce.model.score(pooled),
    packed_reason=library_attention_reason,
)
