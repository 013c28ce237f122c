"""Inference and CPU training over a batch's real tokens only: the encoder's layers run on its texts'
tokens packed into one row, without padding.

Sorted evaluation still pads each batch to its longest text: on the tweets, batches of 64 are 16%
padding, most of it in the long tail's batch. A layer's linear products, GELU and layer norms (most
of a CPU evaluation's time) work on each token alone, so here they see the real tokens only. Attention
alone needs the texts apart: it puts q, k and v back into the padded layout, attends under the
padding mask as before, and packs its output again (a gather and a scatter of the batch's tokens,
small next to the products). It is padding-free ("varlen") inference, done around the attention
kernel because the CPU has no variable-length one. Every real token gets the numbers it would get
padded, up to the products' summation order. Where the classifier reads the first token only, the
last layer runs on the padded rows for that token alone (first_token.py): the layers before it are
packed.

Training on a CPU packs the same way (`pack_tokens_to_train`), through fast dropout's attention (its
own softmax and dropout): the backward passes of the gather and scatter are a scatter and a gather,
and the products, layer norms and dropout masks of both passes see real tokens only. It is for random
batches (`train.group_by_length=false`, as HF Trainer's): on the tweets they are 40% padding, and
packed they train faster than padded (bench/RESULTS.md). Length-grouped batches are 3% padding, too
little to pay for the gathers and scatters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftlab.speed import compat, fast_dropout
from peftlab.speed.attention import (
    base_encoder,
    encoder_layers,
    give_attention,
    padding_mask_only,
)
from peftlab.speed.first_token import first_token_only, is_first_token_only

ATTENTION = "peftlab_packed_tokens"
# attention implementations whose inference is SDPA with the padding mask (fast_dropout's trains
# differently and evaluates with SDPA)
_SDPA_AT_INFERENCE = ("sdpa", fast_dropout.ATTENTION)


class _Batch(threading.local):
    """The batch now packed: its real tokens' positions in the flat [rows x width] layout."""

    index: torch.Tensor | None = None
    rows: int = 0
    width: int = 0
    mask: tuple = (None, None)  # the 2D padding mask and its [rows, 1, 1, width] boolean form


_batch = _Batch()


def _attention_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The rows' 2D padding mask as attention takes it, made once per batch: every layer gets the
    same tensor, so fast dropout's attention makes its additive form once too."""
    if mask is None or mask.dim() != 2:
        return mask
    if _batch.mask[0] is not mask:
        _batch.mask = (mask, mask.bool()[:, None, None, :])
    return _batch.mask[1]


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
    if _batch.index is None or not is_first_token_only(layer):
        return None
    return (_padded(args[0]), *args[1:]), kwargs


def _attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' AttentionInterface signature; q, k, v are [1, heads, tokens, head_dim] while a
    batch is packed, `attention_mask` its 2D padding mask. Attends as fast dropout's attention does:
    SDPA for inference, its own softmax and dropout to train on a CPU."""
    index = _batch.index
    mask = _attention_mask(attention_mask)
    if index is None or query.shape[0] != 1 or query.shape[2] != len(index):  # not packed: as before
        return fast_dropout.attention(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    def padded(x: torch.Tensor) -> torch.Tensor:
        tokens = x[0].transpose(0, 1)  # [tokens, heads, head_dim]
        flat = tokens.new_zeros(_batch.rows * _batch.width, *tokens.shape[1:]).index_copy_(0, index, tokens)
        return flat.view(_batch.rows, _batch.width, *tokens.shape[1:]).transpose(1, 2)

    output, _ = fast_dropout.attention(module, padded(query), padded(key), padded(value), mask, scaling=scaling,
                                       dropout=dropout, **kwargs)  # [rows, width, heads, head_dim]
    return output.reshape(-1, *output.shape[2:]).index_select(0, index).unsqueeze(0), None


def _pack_layers(model: nn.Module, replacing: tuple[str, ...]) -> list | None:
    """Give `model` the packed attention and hook its first and last layers; the hooks' handles, or
    None where the model (or its attention, or its device) is not one packing is done for."""
    encoder = base_encoder(model)
    on_cpu = next(encoder.parameters()).device.type == "cpu"
    layers = encoder_layers(encoder) if on_cpu and hasattr(encoder, "config") else None
    if not layers or not give_attention(model, ATTENTION, _attention, padding_mask_only, replacing=replacing):
        return None
    # Both ends of the last layer are hooked: whether it computes the first token only is read per call.
    return [layers[0].register_forward_pre_hook(_pack, with_kwargs=True),
            layers[-1].register_forward_pre_hook(_unpack_before, with_kwargs=True),
            layers[-1].register_forward_hook(_unpack, with_kwargs=True)]


def pack_tokens_to_train(model: nn.Module) -> bool:
    """From now on `model`'s encoder layers run on real tokens only, in training and evaluation;
    returns whether they do. For training on a CPU with fast dropout's attention (fast_dropout.py),
    which it keeps: products, GELU, layer norms and dropout masks see the real tokens only, attention
    and its dropout the padded rows as before."""
    return _pack_layers(model, replacing=(fast_dropout.ATTENTION,)) is not None


@contextmanager
def packed_tokens(model: nn.Module) -> Iterator[bool]:
    """Within the block, inference of `model` (a family with SDPA attention, SDPA at inference, a PEFT
    model's base too) runs its encoder layers on real tokens only (see the module's docstring); yields
    whether it does. Afterwards the model is as it was. On a CPU only (GPUs are untried)."""
    encoder = base_encoder(model)
    before = compat.attention_implementation(encoder)
    # a model packed to train (pack_tokens_to_train) has its hooks already
    hooks = [] if before == ATTENTION else _pack_layers(model, replacing=_SDPA_AT_INFERENCE)
    if hooks is None:
        yield False
        return
    with first_token_only(model):
        try:
            yield True
        finally:
            for hook in hooks:
                hook.remove()
            if hooks:
                compat.restore_attention(encoder, before)
            _batch.index = None
