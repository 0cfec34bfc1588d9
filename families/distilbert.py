"""DistilBERT: distilbert cross-encoders. No token types; positions 0..; pre_classifier, ReLU and
the classifier on token 0."""

import torch

from families import Family, library_attention_reason


def head(ce, pooled):
    model = ce.model
    return model.classifier(torch.relu(model.pre_classifier(pooled)))


FAMILY = Family(
    name="DistilBERT",
    examples="distilbert-base cross-encoders fine-tuned on MS MARCO",
    model_types=("distilbert",),
    pool=lambda ce: "first",
    head=head,
    packed_reason=library_attention_reason,
)
