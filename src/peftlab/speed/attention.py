"""Which scaled-dot-product attention kernels run on a GPU, where batch shapes vary, and how an
encoder is given an attention function of peftlab's own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftlab.families import supports
from peftlab.speed import compat


@contextmanager
def planless_attention(device: torch.device | str) -> Iterator[None]:
    """On CUDA, attention through the flash and memory-efficient kernels (math as the last resort),
    not cuDNN's. cuDNN builds an execution plan for every new (batch, length) shape, each build slow
    next to a step; length-grouped training and sorted evaluation meet dozens of shapes in an epoch,
    so those builds cost more than cuDNN's faster kernel saves (bench/RESULTS.md). The others need
    no plan and compute the same exact attention. Elsewhere nothing changes."""
    if torch.device(device).type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def base_encoder(model: nn.Module) -> nn.Module:
    """The transformers model itself: a PEFT model's base model, anything else as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encoder_layers(encoder: nn.Module) -> nn.ModuleList | None:
    """The encoder's layers: its ModuleList of `num_hidden_layers` modules (None without one)."""
    count = getattr(encoder.config, "num_hidden_layers", None)
    return next((m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == count), None)


def padding_mask_only(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """transformers' mask interface for attention functions that take the rows' 2D padding mask
    itself: the mask as it came (None without one)."""
    return attention_mask


def give_attention(model: nn.Module, name: str, attention, make_mask, replacing: tuple[str, ...] = ("sdpa",)) -> bool:
    """Register `attention` and the mask builder it expects (transformers' AttentionInterface and
    AttentionMaskInterface) under `name`, and give them to `model` if its family has SDPA attention
    (families.py) and it runs one of the attention implementations `replacing` (a PEFT model's base
    model too); returns whether it got them."""
    encoder = base_encoder(model)
    config = getattr(encoder, "config", None)
    if config is None or not supports(config.model_type, "sdpa_attention") \
            or compat.attention_implementation(encoder) not in replacing:
        return False
    compat.install_attention(encoder, name, attention, make_mask)
    return True
