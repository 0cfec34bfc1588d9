"""RoBERTa and XLM-R: BAAI/bge-reranker-base/large, bge-reranker-v2-m3 (8192 positions),
jina-reranker-v2 (converted to native XLM-R by models.py). One token type; positions start at
padding_idx + 1 for every sequence; the classification head (dense, tanh, out_proj) on token 0."""

from families import Family, library_attention_reason

FAMILY = Family(
    name="RoBERTa / XLM-R",
    examples="BAAI/bge-reranker-base, BAAI/bge-reranker-v2-m3, jinaai/jina-reranker-v2-base-multilingual",
    model_types=("xlm-roberta", "roberta", "camembert", "xlm-roberta-xl"),
    pool=lambda ce: "first",
    head=lambda ce, pooled: ce.model.classifier(pooled[:, None]),
    packed_reason=library_attention_reason,
)
