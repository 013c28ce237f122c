"""Which scaled-dot-product attention kernels run on a GPU, where batch shapes vary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def planless_attention(device: torch.device | str) -> Iterator[None]:
    """On CUDA, attention through the flash and memory-efficient kernels (math as the last resort),
    not cuDNN's. cuDNN builds an execution plan for every new (batch, length) shape, a few hundred
    milliseconds each; length-grouped training and sorted evaluation meet dozens of shapes in an
    epoch, so those builds cost more than cuDNN's faster kernel saves. The others need no plan and
    compute the same exact attention. Elsewhere nothing changes."""
    if torch.device(device).type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
