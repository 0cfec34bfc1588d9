"""BERT: cross-encoder/ms-marco-MiniLM-L6-v2 and most rerankers on the hub. Token types 0 for
`[CLS] A [SEP]`, 1 for `B [SEP]`; positions 0..; the pooler (dense + tanh) on token 0, then the classifier."""

from families import Family, library_attention_reason


def head(ce, pooled):
    model = ce.model
    return model.classifier(model.bert.pooler(pooled[:, None]))


FAMILY = Family(
    name="BERT",
    examples="cross-encoder/ms-marco-MiniLM-L6-v2, cross-encoder/ms-marco-MiniLM-L12-v2",
    model_types=("bert",),
    pool=lambda ce: "first",
    head=head,
    packed_reason=library_attention_reason,
    unsupported=lambda ce: None if getattr(ce.model, "bert", None) is not None and ce.model.bert.pooler is not None
    else f"{type(ce.model).__name__} has no .bert encoder with a pooler",
)
