"""The last encoder layer computed for the first position only, the one the classifier reads.

The sequence classifiers of BERT, RoBERTa, ELECTRA and DistilBERT read the last layer's output at
the first position (the [CLS] token, or the pooler over it) and nothing else. That layer's keys and
values still need every token, but its query, attention output, layer norms and feed-forward block
are needed for that one position: on MiniLM or distilbert-base, 83% of the layer's matrix products
(all but K and V) and most of its element-wise work, a seventh of a 6-layer encoder's. Leaving the other
positions out is exact: their outputs reach no logit and no loss, so the logits and every gradient
stay the same, up to the products' summation order. Training with dropout draws smaller masks, so a
seed gives another run of the same distribution; hence `speed.first_token_last_layer` can turn it off.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftlab.families import supports
from peftlab.speed import compat
from peftlab.speed.attention import base_encoder, encoder_layers


def _attend(attention: nn.Module, query: nn.Module, key: nn.Module, value: nn.Module, first: torch.Tensor,
            hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The first position's attention output [rows, 1, hidden] through the model's own attention
    function (AttentionInterface), over every position's keys and values."""
    head = attention.attention_head_size
    q = query(first).view(first.shape[0], 1, -1, head).transpose(1, 2)
    k = key(hidden).view(*hidden.shape[:-1], -1, head).transpose(1, 2)
    v = value(hidden).view(*hidden.shape[:-1], -1, head).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1]  # an encoder's padding mask is the same for every query
    eager = sys.modules[type(attention).__module__].eager_attention_forward
    attend = compat.attention_function(compat.attention_implementation(attention), eager)
    output, _ = attend(attention, q, k, v, attention_mask, dropout=attention.dropout.p if attention.training else 0.0,
                       scaling=attention.scaling)
    return output.reshape(first.shape[0], 1, -1).contiguous()


def _bert_layer(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    attention, first = layer.attention.self, hidden[:, :1]
    context = _attend(attention, attention.query, attention.key, attention.value, first, hidden, attention_mask)
    return layer.feed_forward_chunk(layer.attention.output(context, first))


def _distilbert_block(block: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    attention, first = block.attention, hidden[:, :1]
    context = _attend(attention, attention.q_lin, attention.k_lin, attention.v_lin, first, hidden, attention_mask)
    attended = block.sa_layer_norm(attention.out_lin(context) + first)
    return block.output_layer_norm(block.ffn(attended) + attended)


def _layer_kind(layer: nn.Module) -> Callable | None:
    if all(hasattr(layer, name) for name in ("attention", "feed_forward_chunk")) and hasattr(layer.attention, "self") \
            and all(hasattr(layer.attention.self, n) for n in ("query", "key", "value", "attention_head_size")):
        return _bert_layer
    if all(hasattr(layer, name) for name in ("attention", "sa_layer_norm", "ffn", "output_layer_norm")) \
            and all(hasattr(layer.attention, n) for n in ("q_lin", "k_lin", "v_lin", "out_lin")):
        return _distilbert_block
    return None


def last_layer(model: nn.Module) -> nn.Module | None:
    """The last encoder layer of a family with a first-token head (families.py; a PEFT model's base
    too), or None."""
    encoder = base_encoder(model)
    config = getattr(encoder, "config", None)
    if config is None or not supports(config.model_type, "first_token_head") or getattr(config, "is_decoder", False):
        return None
    layers = encoder_layers(encoder)
    return layers[-1] if layers and _layer_kind(layers[-1]) else None


def _first_token_forward(self: nn.Module, hidden_states, attention_mask=None, *args, **kwargs):
    if hidden_states.dim() != 3 or any(a is not None for a in args) \
            or any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "encoder_hidden_states")):
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    return _layer_kind(self)(self, hidden_states, attention_mask)


def is_first_token_only(layer: nn.Module) -> bool:
    forward = vars(layer).get("forward")
    return getattr(forward, "__func__", None) is _first_token_forward


def compute_first_token_only(model: nn.Module) -> bool:
    """From now on the last encoder layer of `model` computes position 0 only; returns whether it
    does. A layer called with a cache or encoder states (a decoder's, prefix tuning's) runs in full."""
    layer = last_layer(model)
    if layer is not None and not is_first_token_only(layer):
        # A method bound to this instance: the class, the other layers and the state dict stay as they
        # are, and a deep copy of the model binds it to the copied layer.
        layer.forward = types.MethodType(_first_token_forward, layer)
    return layer is not None


def compute_every_token(model: nn.Module) -> None:
    """Undo `compute_first_token_only`."""
    layer = last_layer(model)
    if layer is not None and is_first_token_only(layer):
        del layer.forward


@contextmanager
def first_token_only(model: nn.Module) -> Iterator[bool]:
    """`compute_first_token_only` within the block; afterwards the layer is as it was before."""
    layer = last_layer(model)
    already = layer is not None and is_first_token_only(layer)
    done = compute_first_token_only(model)
    try:
        yield done
    finally:
        if done and not already:
            compute_every_token(model)
