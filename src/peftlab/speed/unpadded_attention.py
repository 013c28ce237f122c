"""Attention over each text's own tokens on a GPU: flash attention's variable-length form instead
of a padding mask.

With a padding mask, SDPA cannot take its flash kernel and runs the memory-efficient one with the
mask as an additive bias: that kernel, its backward with dropout above all, was a large share of
a LoRA step's GPU time (bench/RESULTS.md). Flash attention's variable-length form takes a batch as
segments of one flat token sequence (`cu_seqlens`) and needs no mask. Here each row is two
segments, its tokens and then its padding, so q, k and v keep their padded layout: no gather or
scatter, the same shapes for CUDA graphs, and every text attends to its own tokens only, as under
the mask. The padding segment attends to itself; like padded positions under a mask, its outputs
reach nothing the loss reads. Rows must be right-padded, as peftlab's collator pads them.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.speed import compat
from peftlab.speed.attention import give_attention, padding_mask_only

ATTENTION = "peftlab_unpadded"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_capable(device: torch.device | str) -> bool:
    """A CUDA GPU that runs torch's flash attention kernels (Ampere or newer)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def segment_bounds(padding_mask: torch.Tensor) -> torch.Tensor:
    """Offsets into the flat [rows x width] tokens where segments start: row i's tokens, then its
    padding (empty when the row is full), and the total; int32 on the mask's device, made without
    reading anything back to the host, so CUDA graphs record it. Each layer makes its own (a few
    small kernels): a bound cached across layers could outlive the batch it was made for, where a
    graph's recording reuses the tensors of its warm-up pass."""
    rows, width = padding_mask.shape
    starts = torch.arange(0, rows * width, width, dtype=torch.int32, device=padding_mask.device)
    bounds = torch.empty(2 * rows + 1, dtype=torch.int32, device=padding_mask.device)
    bounds[0:-1:2] = starts
    bounds[1::2] = starts + padding_mask.sum(1, dtype=torch.int32)
    bounds[-1:].fill_(rows * width)  # a kernel: setting an item would copy from host memory
    return bounds


def _flash_ready(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    head_dim = query.shape[-1]
    return (query.is_cuda and query.dtype in _FLASH_DTYPES and key.dtype == value.dtype == query.dtype
            and key.shape == value.shape == query.shape and head_dim % 8 == 0 and head_dim <= 256)


def unpadded_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' AttentionInterface signature; q, k, v are [rows, heads, width, head_dim] views
    of [rows, width, heads, head_dim] and `attention_mask` the rows' 2D padding mask (see
    `padding_mask_only`). Anything flash cannot take goes to SDPA with the mask."""
    if attention_mask is None or attention_mask.dim() != 2 or not _flash_ready(query, key, value):
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :]
        return compat.sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
    rows, heads, width, head_dim = query.shape
    flat = [x.transpose(1, 2).reshape(rows * width, heads, head_dim) for x in (query, key, value)]
    bounds = segment_bounds(attention_mask)
    output = compat.flash_varlen_forward(*flat, bounds, width, dropout, scaling)
    return output.view(rows, width, heads, head_dim), None


def use_unpadded_attention(model: nn.Module) -> bool:
    """Give the attention above to an encoder whose family has SDPA attention (families.py); returns
    whether `model` got it."""
    return give_attention(model, ATTENTION, unpadded_attention, padding_mask_only)
