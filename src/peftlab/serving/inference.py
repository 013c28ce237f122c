"""A trained classifier ready to predict: texts in, class probabilities out, batched by length."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab import tasks
from peftlab.config import SpeedConfig
from peftlab.errors import DataError
from peftlab.speed.plan import SpeedPlan, inference_plan
from peftlab.windows import Windowed, Windowing, combine, window_texts


def calibrated_thresholds(thresholds: list[float], temperature: list[float]) -> list[float]:
    """Decision thresholds on raw sigmoid probabilities, moved to the probabilities of logits / T."""
    t = np.clip(np.asarray(thresholds, dtype=np.float64), 1e-6, 1 - 1e-6)
    scaled = np.log(t / (1 - t)) / np.asarray(temperature, dtype=np.float64)
    return (1.0 / (1.0 + np.exp(-scaled))).tolist()


def padded_inputs(tokenizer, ids: list[list[int]], device: torch.device,
                  types: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Token ids padded into one batch: the model's input ids and attention mask on `device` (and the
    token types of text pairs, where the model takes them)."""
    features = {"input_ids": ids} | ({"token_type_ids": types} if types is not None else {})
    batch = tokenizer.pad(features, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@dataclass(frozen=True)
class Prediction:
    """What a classifier says of one text."""

    label: str | None
    """The most probable label (single-label); None for multi-label and regression."""
    labels: list[str]
    """Multi-label: every label at or above its decision threshold; single-label: [label]."""
    score: float | None
    """Single-label: the label's probability; regression: the value; multi-label: None."""
    probabilities: dict[str, float]
    """Every label's probability (calibrated unless the classifier is `raw`); empty for a regression."""

    @classmethod
    def of(cls, answer: dict[str, Any]) -> "Prediction":
        """From one of tasks.answer's JSON answers."""
        label = answer.get("label")
        labels = answer.get("labels", [label] if label is not None else [])
        return cls(label, labels, answer.get("score"), answer.get("probabilities", {}))


@dataclass
class Classifier:
    model: torch.nn.Module
    tokenizer: Any
    labels: list[str]
    max_length: int
    device: torch.device
    plan: SpeedPlan | None = None
    """The inference side of the run's speed plan on this device."""
    task: str = "single_label"
    """The run's `data.task`: what its outputs mean (tasks.py)."""
    pair_column: str | None = None
    """The run's `data.text_pair_column`: it was trained on text pairs and predicts on pairs only."""
    thresholds: list[float] | None = None
    """Multi-label decision thresholds kept with the run's best evaluation (data.thresholds)."""
    windowing: Windowing | None = None
    """How the run read long texts (data.long_texts); default: cut at max_length."""
    temperature: list[float] | None = None
    """Temperature scaling fitted on the eval split with the kept checkpoint (calibration.py): the
    probabilities are calibrated unless `raw` (None: no calibration, as for a regression)."""
    raw: bool = False
    """Answer the model's own (uncalibrated) probabilities."""

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = inference_plan(SpeedConfig(), self.device, getattr(self.model.config, "model_type", None))
        if self.temperature is not None and not self.raw and self.thresholds is not None:
            # Multi-label thresholds were tuned on uncalibrated probabilities: the same decisions on the
            # calibrated scale (temperature scaling keeps each label's order).
            self.thresholds = calibrated_thresholds(self.thresholds, self.temperature)

    @classmethod
    def from_run(cls, path: Path | str, device: str | None = None, raw: bool = False) -> "Classifier":
        from peftlab.methods import load_run_model
        from peftlab.models import load_tokenizer
        from peftlab.runs import load_run

        run = load_run(path)
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_run_model(run).to(target).eval()
        plan = inference_plan(run.config.speed, target, model.config.model_type)
        return cls(model, load_tokenizer(str(run.model_dir)), run.labels, run.config.model.max_length, target, plan,
                   run.config.data.task, run.config.data.text_pair_column, run.summary["best"].get("thresholds"),
                   Windowing.of(run.config), run.summary["best"].get("temperature"), raw)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> list[list[int]]:
        """Token ids of each row (a chunked text's windows are rows), as in training and evaluation."""
        return self._tokenized(texts, pairs).input_ids

    def _tokenized(self, texts: list[str], pairs: list[str] | None) -> Windowed:
        if (pairs is None) != (self.pair_column is None):
            raise DataError("this run was trained on text pairs (data.text_pair_column="
                            f"{self.pair_column}): give the second texts too (--text-pair-column)"
                            if pairs is None else "this run was trained on single texts; it takes no second text")
        with_types = pairs is not None and "token_type_ids" in self.tokenizer.model_input_names
        return window_texts(self.tokenizer, texts, pairs, self.windowing or Windowing(max_length=self.max_length),
                            with_types)

    @torch.inference_mode()
    def probabilities(self, texts: list[str], batch_size: int = 64, pairs: list[str] | None = None) -> np.ndarray:
        """What the model says of each text, in the given order: class probabilities (a softmax; for
        multi-label a sigmoid per class), or for regression the value. Texts are sorted by length so
        that each batch pads little (the way evaluation batches); a chunked text's windows are combined."""
        windowed = self._tokenized(texts, pairs)
        ids, types = windowed.input_ids, windowed.token_type_ids
        order = np.argsort([-len(x) for x in ids], kind="stable")
        logits = np.empty((len(ids), len(self.labels)), dtype=np.float32)
        with self.plan.inference(self.model, self.device):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = padded_inputs(self.tokenizer, [ids[i] for i in rows], self.device,
                                      None if types is None else [types[i] for i in rows])
                logits[rows] = self.model(**batch).logits.float().cpu().numpy()
        if windowed.documents is not None:
            logits = combine(logits, windowed.documents, self.windowing.pooling)
        if self.temperature is not None and not self.raw:
            logits = logits / np.asarray(self.temperature, dtype=np.float32)
        return tasks.outputs(self.task, logits, getattr(self.model.config, "label_range", None))

    def predict_proba(self, texts: str | list[str], pairs: str | list[str] | None = None,
                      batch_size: int = 64) -> np.ndarray:
        """`probabilities` of one text or a list of them (texts x labels; a regression's values)."""
        texts, pairs = _as_list(texts), None if pairs is None else _as_list(pairs)
        return self.probabilities(texts, batch_size, pairs)

    def predict(self, texts: str | list[str], pairs: str | list[str] | None = None,
                batch_size: int = 64) -> list[Prediction]:
        """One Prediction per text (of a single text too), in the given order."""
        return [Prediction.of(row) for row in self.label_rows(self.predict_proba(texts, pairs, batch_size))]

    def label_rows(self, probabilities: np.ndarray) -> list[dict[str, Any]]:
        """One answer per text (tasks.answer): label and probabilities; labels above the threshold; or the value."""
        return tasks.answer(self.task, probabilities, self.labels, self.thresholds)


def _as_list(texts: str | list[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise DataError("texts are a string or a list of strings")
    return list(texts)
