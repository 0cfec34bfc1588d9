"""ModernBERT: ettin rerankers, Alibaba-NLP/gte-reranker-modernbert-base, granite-embedding-reranker.
No token types; rotary positions 0..; local layers attend within a window (the attention function
gets it as `sliding_window`); `classifier_pooling` cls or mean, then head and classifier."""

from families import Family, library_attention_reason


def pool(ce) -> str:
    kind = ce.model.config.classifier_pooling
    return {"cls": "first", "mean": "mean"}.get(kind, kind)


FAMILY = Family(
    name="ModernBERT",
    examples="Alibaba-NLP/gte-reranker-modernbert-base, jhu-clsp/ettin-encoder rerankers",
    model_types=("modernbert",),
    pool=pool,
    head=lambda ce, pooled: ce.model.classifier(ce.model.head(pooled)),
    packed_reason=library_attention_reason,
)
