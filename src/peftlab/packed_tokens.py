"""Inference over a batch's real tokens only: the encoder's layers run on its texts' tokens packed
into one row, without padding.

Sorted evaluation still pads each batch to its longest text: on the tweets, batches of 64 are 16%
padding, most of it in the long tail's batch. A layer's linear products, GELU and layer norms (about
85% of a CPU evaluation) work on each token alone, so here they see the real tokens only. Attention
alone needs the texts apart: it puts q, k and v back into the padded layout, attends under the
padding mask as before, and packs its output again (a gather and a scatter of the batch's tokens,
small next to the products). It is padding-free ("varlen") inference, done around the attention
kernel because the CPU has no variable-length one. Every real token gets the numbers it would get
padded, up to the products' summation order. Where the classifier reads the first token only, the
last layer runs on the padded rows for that token alone (first_token.py): the layers before it are
packed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftlab import fast_dropout
from peftlab.attention_kernels import encoder_layers, give_attention, padding_mask_only
from peftlab.first_token import first_token_only

ATTENTION = "peftlab_packed_tokens"
# attention implementations whose inference is SDPA with the padding mask (fast_dropout's trains
# differently and evaluates with SDPA)
_SDPA_AT_INFERENCE = ("sdpa", fast_dropout.ATTENTION)


class _Batch(threading.local):
    """The batch now packed: its real tokens' positions in the flat [rows x width] layout."""

    index: torch.Tensor | None = None
    rows: int = 0
    width: int = 0


_batch = _Batch()


def _pack(layer, args, kwargs):
    """Before the first layer: [rows, width, hidden] to the real tokens as one row [1, tokens, hidden]."""
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if len(args) == 0 or mask is None or mask.dim() != 2 or bool(mask.all()):  # nothing to leave out
        _batch.index = None
        return None
    hidden = args[0]
    _batch.rows, _batch.width = mask.shape
    _batch.index = mask.reshape(-1).nonzero().squeeze(1)
    packed = hidden.reshape(-1, hidden.shape[-1]).index_select(0, _batch.index).unsqueeze(0)
    return (packed, *args[1:]), kwargs


def _padded(hidden: torch.Tensor) -> torch.Tensor:
    """[1, tokens, hidden] back to [rows, width, hidden], padding positions zero."""
    flat = hidden.new_zeros(_batch.rows * _batch.width, hidden.shape[-1]).index_copy_(0, _batch.index, hidden[0])
    _batch.index = None
    return flat.view(_batch.rows, _batch.width, -1)


def _unpack(layer, args, kwargs, output):
    """After the last layer: back to the padded layout (no head reads the padding positions)."""
    return None if _batch.index is None else _padded(output)


def _unpack_before(layer, args, kwargs):
    """Before a last layer that computes the first token only (first_token.py): its queries are
    each row's first token, its keys and values the padded rows."""
    return None if _batch.index is None else ((_padded(args[0]), *args[1:]), kwargs)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' AttentionInterface signature; q, k, v are [1, heads, tokens, head_dim] while a
    batch is packed, `attention_mask` its 2D padding mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    index = _batch.index
    mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    if index is None or query.shape[0] != 1 or query.shape[2] != len(index):  # not packed: as before
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    def padded(x: torch.Tensor) -> torch.Tensor:
        tokens = x[0].transpose(0, 1)  # [tokens, heads, head_dim]
        flat = tokens.new_zeros(_batch.rows * _batch.width, *tokens.shape[1:]).index_copy_(0, index, tokens)
        return flat.view(_batch.rows, _batch.width, *tokens.shape[1:]).transpose(1, 2)

    output, _ = sdpa_attention_forward(module, padded(query), padded(key), padded(value), mask, scaling=scaling,
                                       dropout=dropout, **kwargs)  # [rows, width, heads, head_dim]
    return output.reshape(-1, *output.shape[2:]).index_select(0, index).unsqueeze(0), None


@contextmanager
def packed_tokens(model: nn.Module) -> Iterator[bool]:
    """Within the block, inference of `model` (one of ATTENTION_MODELS with SDPA at inference, a PEFT
    model's base too) runs its encoder layers on real tokens only (see the module's docstring); yields
    whether it does. Afterwards the model is as it was. On a CPU only (GPUs are untried). Not for
    training: the gradients would be right, but the explicit attention that training on a CPU uses is
    left out here."""
    encoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    on_cpu = next(encoder.parameters()).device.type == "cpu"
    before = getattr(getattr(encoder, "config", None), "_attn_implementation", None) if on_cpu else None
    layers = encoder_layers(encoder) if before is not None else None
    if not layers or not give_attention(model, ATTENTION, _attention, padding_mask_only, replacing=_SDPA_AT_INFERENCE):
        yield False
        return
    with first_token_only(model) as first_only:
        hooks = [layers[0].register_forward_pre_hook(_pack, with_kwargs=True),
                 layers[-1].register_forward_pre_hook(_unpack_before, with_kwargs=True) if first_only
                 else layers[-1].register_forward_hook(_unpack, with_kwargs=True)]
        try:
            yield True
        finally:
            for hook in hooks:
                hook.remove()
            encoder.set_attn_implementation(before)
            _batch.index = None
