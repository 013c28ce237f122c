"""Gradient-norm clipping, folded into the fused AdamW step where it can be.

`clip_grad_norm_` reads every gradient for the norm, then reads and writes every gradient again to
scale it, and the optimizer reads them a third time. A fused AdamW can divide the gradients by a
scale as it reads them: that is how torch's GradScaler unscales fp16 gradients. The scale is handed
over the same way, as the optimizer's `grad_scale` attribute for one step. Clipping then costs only
the norm's pass. In full fine-tuning on a CPU that pass over 50 MB of gradients was about 2% of a
step. The update is the same up to rounding: it divides by norm / max_norm instead of multiplying by
its inverse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gradient_clipper(accelerator, optimizer, params: list[torch.Tensor], max_norm: float) -> Callable[[], None]:
    """A function that clips the gradients of `params` to `max_norm` before the next optimizer step:
    folded into the step for a fused torch optimizer without GradScaler or sharding, else
    accelerate's `clip_grad_norm_`."""
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    foldable = (accelerator.scaler is None and getattr(inner, "_step_supports_amp_scaling", False)
                and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                     DistributedType.MULTI_GPU))
    if not foldable:
        return lambda: accelerator.clip_grad_norm_(params, max_norm)

    def forget_scale(opt, args, kwargs) -> None:
        opt.__dict__.pop("grad_scale", None)  # it holds for one step only

    inner.register_step_post_hook(forget_scale)

    def clip() -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # clip_grad_norm_ multiplies by max_norm / (norm + 1e-6) when that is below 1
        inner.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)

    return clip
