"""Run a classifier over a loader and score it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peftlab.batching import model_inputs
from peftlab.calibration import calibrate
from peftlab.tasks import per_example_loss, score
from peftlab.windows import combine

if TYPE_CHECKING:
    from peftlab.speed.plan import SpeedPlan


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
def predict(model: torch.nn.Module, loader, accelerator, plan: SpeedPlan, task: str = "single_label") -> Predictions:
    """Logits and per-example losses in row order, gathered across processes: every example once.
    The run's speed plan gives the paths inference takes."""
    model.eval()
    chunks: list[tuple[torch.Tensor, ...]] = []
    with plan.inference(model, accelerator.device):
        for batch in loader:
            logits = model(**model_inputs(batch)).logits.float()
            losses = per_example_loss(task, logits, batch["labels"])
            chunks.append(accelerator.gather_for_metrics((logits, batch["labels"], losses, batch["index"])))
    logits, labels, losses, index = (torch.cat([c[i] for c in chunks]).cpu().numpy() for i in range(4))
    # Batches come sorted by length: back to row order. Processes pad the last round of batches
    # with repeated rows; gather_for_metrics drops those for samplers it knows, and keeping the
    # first copy of each index makes sure for ours too.
    index, first = np.unique(index, return_index=True)
    if len(index) != len(loader.dataset):
        raise RuntimeError(f"evaluation gathered {len(index)} of {len(loader.dataset)} examples")
    return Predictions(logits[first], labels[first], losses[first])


def per_text(predictions: Predictions, documents: np.ndarray | None, pooling: str, task: str) -> Predictions:
    """A chunked text's windows combined into one row (windows.combine), its loss that of the combined
    logits: metrics count texts, not windows."""
    if documents is None:
        return predictions
    logits = combine(predictions.logits, documents, pooling)
    labels = predictions.labels[np.unique(documents, return_index=True)[1]]
    losses = per_example_loss(task, torch.from_numpy(logits), torch.from_numpy(labels)).numpy()
    return Predictions(logits, labels, losses)


def evaluate(model: torch.nn.Module, loader, accelerator, names: list[str], plan: SpeedPlan,
             task: str = "single_label", thresholds: str = "fixed",
             calibration_fraction: float | None = None) -> dict[str, Any]:
    """The task's metrics per text, and the temperature scaling fitted on these logits with the
    calibration it gives (calibration.calibrate)."""
    encoded = loader.dataset.encoded
    predictions = per_text(predict(model, loader, accelerator, plan, task), encoded.documents, encoded.pooling, task)
    label_range = getattr(accelerator.unwrap_model(model).config, "label_range", None)  # models.load_classifier
    metrics = score(task, predictions.labels, predictions.logits, names, thresholds, label_range)
    metrics |= long_text_scores(task, predictions, encoded.long_texts, names, label_range, metrics.get("thresholds"))
    metrics |= calibrate(task, predictions.labels, predictions.logits, calibration_fraction)
    return {"eval_loss": float(predictions.losses.mean()), **metrics}


# The headline metrics that long_text_scores repeats over the texts one window cannot hold.
LONG_TEXT_METRICS = ("accuracy", "f1_macro", "f1_micro", "pearson", "mae")


def long_text_scores(task: str, predictions: Predictions, long_texts: np.ndarray | None, names: list[str],
                     label_range: Any = None, chosen: Any = None) -> dict[str, Any]:
    """`long_texts` (how many texts one window cannot hold) and the headline metrics over those texts
    alone (`f1_macro_long`, ...): where truncation loses words and data.long_texts decides, which the
    metrics over every text dilute with the texts that fit. Multi-label keeps the thresholds chosen
    over every text. Nothing where fewer than two texts are long."""
    if long_texts is None or long_texts.sum() < 2:
        return {}
    subset = score(task, predictions.labels[long_texts], predictions.logits[long_texts], names,
                   label_range=label_range, chosen=chosen)
    return {"long_texts": int(long_texts.sum()),
            **{f"{name}_long": subset[name] for name in LONG_TEXT_METRICS if name in subset}}
