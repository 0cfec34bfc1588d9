"""DeBERTa-v2/v3: mixedbread-ai/mxbai-rerank-base-v1. Relative position attention (c2p / p2c) is
computed from the padded layout inside the model and has no attention-interface dispatch, so it
runs padded; ContextPooler on token 0, then the classifier."""

from families import Family


def head(ce, pooled):
    return ce.model.classifier(ce.model.pooler(pooled[:, None]))


FAMILY = Family(
    name="DeBERTa-v2",
    examples="mixedbread-ai/mxbai-rerank-base-v1, mixedbread-ai/mxbai-rerank-large-v1",
    model_types=("deberta-v2",),
    pool=lambda ce: "first",
    head=head,
    packed_reason=lambda ce: "DeBERTa's relative attention (c2p/p2c) is built from the padded layout and has "
                             "no attention-interface dispatch",
)
