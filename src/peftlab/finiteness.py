"""Steps whose loss is not finite: found before the optimizer step, or one step later on a GPU.

Reading whether a loss is finite makes the host wait for the GPU to finish that step's passes, and
the GPU then sits idle while the host queues the clipping, the optimizer step and the next batch.
`LaggedCheck` avoids that wait where no step may be skipped (`train.skip_nonfinite_steps: 0`, the
default, in one process): the verdict goes to the fused AdamW as its `found_inf`, the way torch's
GradScaler skips an fp16 step (the kernel leaves weights, moments and step count as they were), and
the host reads it after the next step's passes are queued. A non-finite step thus never updates the
weights, and the run stops before the next optimizer step, as with the immediate check.
"""

from __future__ import annotations

import math

import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the optimizer step."""


ADVICE = ("training stopped before that optimizer step; lower train.lr, check the data, or allow a few "
          "skipped steps with train.skip_nonfinite_steps")


def finite_or_skipped(loss: torch.Tensor, state, cfg, passes, accelerator, warn) -> bool:
    """True when the loss is finite in every process. A non-finite one is skipped (no update) while
    `skip_nonfinite_steps` allows, else the run stops before the optimizer step. Processes decide
    together: one that skipped its backward pass alone would leave the others waiting in its
    gradient all-reduce."""
    finite = torch.isfinite(loss.detach()).all()
    if accelerator.num_processes > 1:
        finite = finite.to(torch.int32).reshape(1)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if finite.item():
        return True
    own = loss.item()
    what = f"the loss became {own}" if not math.isfinite(own) else "the loss became non-finite in another process"
    if state.skipped_steps < cfg.skip_nonfinite_steps:
        state.skipped_steps += 1
        passes.zero_grad()
        warn(f"warning: {what} at step {state.step + 1}; step skipped "
             f"({state.skipped_steps} of at most {cfg.skip_nonfinite_steps})")
        return False
    raise NonFiniteLossError(f"{what} at step {state.step + 1} (epoch {state.epoch}); {ADVICE}")


def can_lag(cfg, accelerator, optimizer, sharded: bool) -> bool:
    """Whether the check may come a step late: on a GPU (a CPU does not wait), one unsharded process,
    no step to skip, no fp16 loss scaler (it hands `found_inf` over itself) and an optimizer that
    takes `found_inf` (torch's fused ones)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return (accelerator.device.type == "cuda" and accelerator.num_processes == 1 and not sharded
            and cfg.skip_nonfinite_steps == 0 and accelerator.scaler is None
            and getattr(inner, "_step_supports_amp_scaling", False))


class LaggedCheck:
    """See the module's docstring. Per micro-batch `add(loss)`; before each optimizer step
    `hand_over(step, epoch)`; `settle()` raises for a non-finite step handed over earlier. The loop
    settles after queueing each step's passes and before it reads figures, evaluates or saves."""

    def __init__(self, optimizer) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one
        self.optimizer.register_step_post_hook(lambda opt, args, kwargs: opt.__dict__.pop("found_inf", None))
        self.not_finite: torch.Tensor | None = None  # 1.0 if a micro-batch of this step had a non-finite loss
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None, int, int] | None = None

    def add(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        self.not_finite = bad if self.not_finite is None else torch.maximum(self.not_finite, bad)

    def hand_over(self, step: int, epoch: int) -> None:
        flag, self.not_finite = self.not_finite, None
        self.optimizer.found_inf = flag
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
