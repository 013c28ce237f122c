"""A training step's passes, op by op: `step(batch) -> loss`, the interface every step has (a CUDA
graph's replay is speed/cuda_graphs.py's GraphedStep)."""

from __future__ import annotations

import torch

from peftlab.batching import model_inputs


class EagerStep:
    """A micro-batch's forward and backward passes, launched op by op; returns the loss."""

    def __init__(self, model, optimizer, accelerator) -> None:
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.model(**model_inputs(batch), labels=batch["labels"]).loss
        self.accelerator.backward(loss)
        return loss

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
