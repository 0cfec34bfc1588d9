"""ELECTRA: cross-encoder/ms-marco-electra-base. Token types as BERT; positions 0..; the
classification head (dense, gelu, out_proj) on token 0."""

from families import Family, library_attention_reason

FAMILY = Family(
    name="ELECTRA",
    examples="cross-encoder/ms-marco-electra-base",
    model_types=("electra",),
    pool=lambda ce: "first",
    head=lambda ce, pooled: ce.model.classifier(pooled[:, None]),
    packed_reason=library_attention_reason,
)
