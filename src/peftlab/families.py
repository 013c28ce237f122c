"""The model families peftlab knows, in one table: the names of their attention and feed-forward
modules (for `method.targets`), and which speed paths are verified on them. Adding a family is one
entry here; a model type that is not listed still trains, with `all-linear` or explicit targets
and without the speed paths that need to know its layout."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    attention: str
    """Regex over full module names: the attention projections (`method.targets: attention`)."""
    feedforward: str
    """Regex over full module names: the feed-forward layers (`method.targets: feedforward`)."""
    sdpa_attention: bool = False
    """Attention is plain scaled dot-product through transformers' AttentionInterface, without sliding
    windows or relative positions: peftlab may give it an attention function of its own (fast
    dropout's, packed tokens', unpadded attention)."""
    first_token_head: bool = False
    """The classifier reads position 0 of the last layer only, and that layer is laid out as BERT's
    (or DistilBERT's) layer: it may compute that position alone (speed.first_token_last_layer)."""
    cuda_graphs_verified: bool = False
    """Training steps recorded as CUDA graphs and checked against op-by-op steps on a GPU."""
    pooling_key: str | None = None
    """The config key that says where the sequence classifier reads (ModernBERT's `classifier_pooling`,
    "cls" or "mean"); None: it always reads position 0 ([CLS], <s>)."""


_BERT_FFN = r"\.(intermediate\.dense|layer\.\d+\.output\.dense)$"
_BERT = ModelFamily(attention=r"\.attention\.(self\.(query|key|value)|output\.dense)$", feedforward=_BERT_FFN,
                    sdpa_attention=True, first_token_head=True)

FAMILIES: dict[str, ModelFamily] = {
    "bert": ModelFamily(**{**vars(_BERT), "cuda_graphs_verified": True}),
    "roberta": ModelFamily(**{**vars(_BERT), "cuda_graphs_verified": True}),
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": ModelFamily(attention=r"\.attention\.(q_lin|k_lin|v_lin|out_lin)$", feedforward=r"\.ffn\.(lin1|lin2)$",
                              sdpa_attention=True, first_token_head=True, cuda_graphs_verified=True),
    "deberta-v2": ModelFamily(attention=r"\.attention\.(self\.(query_proj|key_proj|value_proj)|output\.dense)$",
                              feedforward=_BERT_FFN),
    "modernbert": ModelFamily(attention=r"\.attn\.(Wqkv|Wo)$", feedforward=r"\.mlp\.(Wi|Wo)$",
                              pooling_key="classifier_pooling"),
    "mpnet": ModelFamily(attention=r"\.attn\.(q|k|v|o)$", feedforward=_BERT_FFN),
}


def family(model_type: str | None) -> ModelFamily | None:
    return FAMILIES.get(model_type or "")


def supports(model_type: str | None, feature: str) -> bool:
    """Whether the family of `model_type` has `feature` (a boolean field of ModelFamily)."""
    known = family(model_type)
    return bool(known and getattr(known, feature))


def classifier_pooling(config) -> str | None:
    """Where the sequence classifier of a model (its transformers config) reads the last layer:
    "cls" (position 0), another pooling its config names ("mean"), or None for a family peftlab does
    not know."""
    known = family(getattr(config, "model_type", None))
    if known is None:
        return None
    return str(getattr(config, known.pooling_key, "cls")) if known.pooling_key else "cls"


def with_feature(feature: str) -> list[str]:
    return sorted(name for name, known in FAMILIES.items() if getattr(known, feature))
