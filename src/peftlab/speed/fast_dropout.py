"""Dropout whose masks are drawn fast on a CPU: the same rate, a cheaper random stream.

torch's CPU dropout draws one Mersenne-Twister float per element, on one thread: on MiniLM with
tweets it was a large share of a LoRA training step (bench/RESULTS.md). Here each mask takes one
seed from torch's generator (so runs stay reproducible and resumable) and numpy's SFC64 fills it
with 64-bit words, split into four 16-bit numbers that are compared with a threshold: the drop rate
is kept to 1/65536. numpy's vectorised compare then writes the mask's bit patterns directly (0 or
the scale 1/(1-p) in the activations' dtype): torch's int16 compare and bool-to-bf16 cast on a CPU
took longer than the draws. That made the masks cheaper than drawing them with torch.randint
(bench/RESULTS.md). Dropout on attention probabilities happens inside
`scaled_dot_product_attention`, out of reach, so for training on a CPU the encoders whose family has
SDPA attention (families.py) get an attention function that computes the probabilities itself (at
these short lengths as fast as SDPA's math path) and drops them here; evaluation still runs SDPA.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from peftlab.speed import compat
from peftlab.speed.attention import give_attention

ATTENTION = "peftlab_cpu_train"
_LEVELS = 1 << 16
_SAME_SIZE_INT = {1: (torch.int8, np.int8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32),
                  8: (torch.int64, np.int64)}


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """1/(1-p) with probability 1-p, else 0, elementwise: the scaled mask of inverted dropout."""
    count = shape.numel()
    seed = int(torch.randint(0, 1 << 62, ()))
    levels = np.random.SFC64(seed).random_raw((count + 3) // 4).view(np.int16)[:count]
    torch_int, numpy_int = _SAME_SIZE_INT[torch.finfo(dtype).bits // 8]
    scale_bits = torch.tensor(1.0 / (1.0 - p), dtype=dtype).view(torch_int).item()
    mask = np.empty(count, dtype=numpy_int)
    np.greater_equal(levels, round(p * _LEVELS) - _LEVELS // 2, out=mask, casting="unsafe")  # 1 or 0
    mask *= numpy_int(scale_bits)  # the bit pattern of the scale, or of 0.0
    return torch.from_numpy(mask).view(dtype).view(shape)


def drop(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":  # GPU dropout draws in parallel already
        return nn.functional.dropout(x, p, True)
    return x * keep_mask(x.shape, p, x.dtype)


class FastDropout(nn.Dropout):
    """nn.Dropout with the same `p` (attention code reads it) and the mask drawn by `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' AttentionInterface signature: SDPA for inference, explicit softmax to train."""
    if not module.training or query.device.type != "cpu":
        return compat.sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + (_additive(attention_mask, scores.dtype) if attention_mask.dtype == torch.bool
                           else attention_mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = drop(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


_last_mask: list = [None, None, None]  # the boolean mask, the dtype and its additive form


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as 0 / the dtype's minimum, made once per forward pass: every layer gets the
    same mask tensor. Adding it gives the same probabilities as masked_fill (exp underflows to 0
    either way) without inverting the mask in each layer, and its backward pass is free: attention
    and a LoRA step take less time (bench/RESULTS.md)."""
    if _last_mask[0] is not mask or _last_mask[1] != dtype:
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        _last_mask[:] = [mask, dtype, additive]
    return _last_mask[2]


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout of `model` (PEFT adapters' too) for FastDropout, and the attention of
    the encoders with SDPA attention; returns how many dropout modules were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = FastDropout  # same state, another forward
            swapped += 1
    give_attention(model, ATTENTION, attention, compat.sdpa_mask)
    return swapped
