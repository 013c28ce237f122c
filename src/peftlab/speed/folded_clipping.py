"""Gradient-norm clipping folded into the fused AdamW step (`speed.folded_clipping`).

`clip_grad_norm_` reads every gradient for the norm, then reads and writes every gradient again to
scale it, and the optimizer reads them a third time. A fused AdamW can divide the gradients by a
scale as it reads them: that is how torch's GradScaler unscales fp16 gradients. The scale is handed
over the same way, as the optimizer's `grad_scale` for one step. Clipping then costs only the
norm's pass. The update is the same up to rounding: it divides by norm / max_norm instead of
multiplying by its inverse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from peftlab.speed import compat


def gradient_clipper(accelerator, optimizer, params: list[torch.Tensor], max_norm: float,
                     folded: bool) -> Callable[[], None]:
    """A function that clips the gradients of `params` to `max_norm` before the next optimizer step:
    folded into the step (a fused torch optimizer, without GradScaler or sharding: the plan checks),
    else accelerate's `clip_grad_norm_`."""
    if not folded:
        return lambda: accelerator.clip_grad_norm_(params, max_norm)

    def clip() -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # clip_grad_norm_ multiplies by max_norm / (norm + 1e-6) when that is below 1
        compat.for_next_step(optimizer, "grad_scale", torch.clamp((norm + 1e-6) / max_norm, min=1.0))

    return clip
