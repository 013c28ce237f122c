"""A training step's passes, op by op: `step(batch) -> loss`, the interface every step has (a CUDA
graph's replay is speed/cuda_graphs.py's GraphedStep)."""

from __future__ import annotations

import torch

from peftlab.batching import model_inputs


class EagerStep:
    """A micro-batch's forward and backward passes, launched op by op; returns the loss: the model's
    own, or `loss_function(logits, labels)` (class weights, focal loss: training/losses.py)."""

    def __init__(self, model, optimizer, accelerator, loss_function=None) -> None:
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.loss_function = loss_function

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = model_loss(self.model, model_inputs(batch), batch["labels"], self.loss_function)
        self.accelerator.backward(loss)
        return loss

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def model_loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, loss_function=None) -> torch.Tensor:
    if loss_function is None:
        return model(**inputs, labels=labels).loss
    return loss_function(model(**inputs).logits, labels)
