"""Steps whose loss is not finite: skipped while `train.skip_nonfinite_steps` allows, else the run
stops before the optimizer step (on a GPU the check may come a step late: speed/lagged_check.py)."""

from __future__ import annotations

import math

import torch

from peftlab.errors import NonFiniteLossError
from peftlab.speed.lagged_check import ADVICE


def finite_or_skipped(loss: torch.Tensor, state, cfg, training_step, accelerator, warn) -> bool:
    """True when the loss is finite in every process. A non-finite one is skipped (no update) while
    `skip_nonfinite_steps` allows, else the run stops before the optimizer step. Processes decide
    together: one that skipped its optimizer step alone would fall out of step with the others."""
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
        training_step.zero_grad()
        warn(f"warning: {what} at step {state.step + 1}; step skipped "
             f"({state.skipped_steps} of at most {cfg.skip_nonfinite_steps})")
        return False
    raise NonFiniteLossError(f"{what} at step {state.step + 1} (epoch {state.epoch}); {ADVICE}")
