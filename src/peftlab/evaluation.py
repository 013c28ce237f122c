"""Run a classifier over a loader and score it."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from peftlab.attention_kernels import planless_attention
from peftlab.compiled_blocks import run_eagerly
from peftlab.metrics import classification_metrics
from peftlab.packed_linear import packed_for_inference
from peftlab.packed_tokens import packed_tokens

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


@dataclass
class Predictions:
    """Per-example outputs in the dataset's own row order."""

    logits: np.ndarray
    labels: np.ndarray
    losses: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=-1)


@torch.inference_mode()
def predict(model: torch.nn.Module, loader, accelerator) -> Predictions:
    """Logits and per-example losses in row order, gathered across processes: every example once."""
    model.eval()
    chunks: list[tuple[torch.Tensor, ...]] = []
    packed = accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
    with planless_attention(accelerator.device), run_eagerly(), \
            packed_for_inference(model) if packed else nullcontext(), \
            packed_tokens(accelerator.unwrap_model(model)):  # once, not per batch
        for batch in loader:
            logits = model(**model_inputs(batch)).logits.float()
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            chunks.append(accelerator.gather_for_metrics((logits, batch["labels"], losses, batch["index"])))
    logits, labels, losses, index = (torch.cat([c[i] for c in chunks]).cpu().numpy() for i in range(4))
    # Batches come sorted by length: back to row order. Processes pad the last round of batches
    # with repeated rows; gather_for_metrics drops those for samplers it knows, and keeping the
    # first copy of each index makes sure for ours too.
    index, first = np.unique(index, return_index=True)
    if len(index) != len(loader.dataset):
        raise RuntimeError(f"evaluation gathered {len(index)} of {len(loader.dataset)} examples")
    return Predictions(logits[first], labels[first], losses[first])


def evaluate(model: torch.nn.Module, loader, accelerator, names: list[str]) -> dict[str, Any]:
    predictions = predict(model, loader, accelerator)
    metrics = classification_metrics(predictions.labels, predictions.predicted, names)
    return {"eval_loss": float(predictions.losses.mean()), **metrics}
