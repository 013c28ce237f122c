"""The finiteness check a step late on a GPU (`speed.lagged_finiteness_check`).

Reading whether a loss is finite makes the host wait for the GPU to finish that step's passes, and
the GPU then sits idle while the host queues the clipping, the optimizer step and the next batch.
`LaggedCheck` avoids that wait where no step may be skipped (`train.skip_nonfinite_steps: 0`, the
default, in one process): the verdict goes to the fused AdamW as its `found_inf`, the way torch's
GradScaler skips an fp16 step (the kernel leaves weights, moments and step count as they were), and
the host reads it after the next step's passes are queued. A non-finite step thus never updates the
weights, and the run stops before the next optimizer step, as with the immediate check.
"""

from __future__ import annotations

import torch

from peftlab.errors import NonFiniteLossError
from peftlab.speed import compat

ADVICE = ("training stopped before that optimizer step; lower train.lr, check the data, or allow a few "
          "skipped steps with train.skip_nonfinite_steps")


class LaggedCheck:
    """See the module's docstring. Per micro-batch `add(loss)`; before each optimizer step
    `hand_over(step, epoch)`; `settle()` raises for a non-finite step handed over earlier. The loop
    settles after queueing each step's passes and before it reads figures, evaluates or saves."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.not_finite: torch.Tensor | None = None  # 1.0 if a micro-batch of this step had a non-finite loss
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None, int, int] | None = None

    def add(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        self.not_finite = bad if self.not_finite is None else torch.maximum(self.not_finite, bad)

    def hand_over(self, step: int, epoch: int) -> None:
        flag, self.not_finite = self.not_finite, None
        compat.for_next_step(self.optimizer, "found_inf", flag)
        on_gpu = flag.device.type == "cuda"
        host = torch.empty((), dtype=flag.dtype, pin_memory=on_gpu).copy_(flag, non_blocking=on_gpu)
        event = torch.cuda.Event() if on_gpu else None
        if event:
            event.record()  # after the copy: waiting on it leaves the work queued later running
        self.pending = (host, event, step, epoch)

    def settle(self) -> None:
        if self.pending is None:
            return
        host, event, step, epoch = self.pending
        self.pending = None
        if event:
            event.synchronize()
        if host.item():
            raise NonFiniteLossError(f"the loss became non-finite at step {step} (epoch {epoch}); {ADVICE}")
