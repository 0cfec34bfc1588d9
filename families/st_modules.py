"""A transformer without a classification head, followed by sentence-transformers modules that make
the score: Pooling (cls, mean or lasttoken), then Dense / Normalize / ... layers ending in `scores`.
The pooled rows go through the same module objects CrossEncoder runs."""

from families import Family, library_attention_reason

_POOLS = {"cls": "first", "mean": "mean", "lasttoken": "last"}


def _pooling(ce):
    tail = list(ce)[1:]
    return tail[0] if tail and type(tail[0]).__name__ == "Pooling" else None


def unsupported(ce) -> str | None:
    pooling = _pooling(ce)
    if pooling is None:
        return "the first module after the transformer must be a Pooling module"
    if pooling.pooling_mode not in _POOLS:
        return f"Pooling mode {pooling.pooling_mode!r} (supported: {', '.join(_POOLS)})"
    if not pooling.include_prompt:
        return "Pooling with include_prompt=False"
    return None


def head(ce, pooled):
    features = {"sentence_embedding": pooled}
    for module in list(ce)[2:]:
        features = module(features)
    if "scores" not in features:
        raise ValueError("the sentence-transformers modules after Pooling wrote no 'scores'")
    return features["scores"]


FAMILY = Family(
    name="transformer + sentence-transformers head",
    examples="CrossEncoders saved with Pooling + Dense(module_output_name='scores') modules",
    model_types=(),
    pool=lambda ce: _POOLS[_pooling(ce).pooling_mode],
    head=head,
    packed_reason=library_attention_reason,
    unsupported=unsupported,
    base=lambda ce: ce.model,
)
