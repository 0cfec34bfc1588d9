"""Causal language models scored by sentence-transformers' LogitScore: Qwen3-Reranker,
mxbai-rerank-v2. The prompt template is CrossEncoder's own (its chat template, applied by its
preprocess, truncation keeping the template's end); the score is logit(true) - logit(false) at the
last token. Only those two rows of the output projection are computed, never the vocabulary."""

from families import Family, library_attention_reason


def matches(tail) -> bool:
    from sentence_transformers.cross_encoder.modules import LogitScore

    return len(tail) == 1 and isinstance(tail[0], LogitScore)


def _score_module(ce):
    return list(ce)[1]


def unsupported(ce) -> str | None:
    if getattr(ce.model, "lm_head", None) is None:
        return f"{type(ce.model).__name__} has no lm_head"
    return None


def head(ce, pooled):
    score = _score_module(ce)
    rows = [score.true_token_id] + ([] if score.false_token_id is None else [score.false_token_id])
    weight = ce.model.lm_head.weight[rows]  # (1 or 2, hidden): the only logits LogitScore reads
    logits = pooled @ weight.T
    if ce.model.lm_head.bias is not None:
        logits = logits + ce.model.lm_head.bias[rows]
    return logits if len(rows) == 1 else logits[:, :1] - logits[:, 1:]


FAMILY = Family(
    name="causal LM + LogitScore",
    examples="Qwen/Qwen3-Reranker-0.6B, mixedbread-ai/mxbai-rerank-base-v2",
    model_types=(),
    pool=lambda ce: "last",
    head=head,
    packed_reason=library_attention_reason,
    unsupported=unsupported,
)
