"""The shapes of problem peftlab trains for (`data.task`), and what each decides: how a label cell is
read and encoded, the head's `problem_type`, the per-example loss of evaluation, the metrics and
which of them may pick the best model, and how a prediction is answered.

- `single_label`: one class per text (softmax over the classes, cross-entropy).
- `multi_label`: any number of classes per text, none included (a sigmoid per class, binary
  cross-entropy); a label cell is a list (JSONL, parquet) or a `data.label_separator`-separated string.
- `regression`: a number per text (one output, mean squared error).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TASKS = ("single_label", "multi_label", "regression")
PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                 "regression": "regression"}
TASK_OF_PROBLEM = {problem: task for task, problem in PROBLEM_TYPES.items()}
METRICS = {
    "single_label": ("accuracy", "f1", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
                     "balanced_accuracy", "mcc", "roc_auc", "pr_auc", "eval_loss"),
    "multi_label": ("f1_micro", "f1_macro", "f1_weighted", "f1_samples", "subset_accuracy", "hamming_loss",
                    "roc_auc_macro", "average_precision_macro", "eval_loss"),
    "regression": ("pearson", "spearman", "mse", "mae", "r2", "eval_loss"),
}
DEFAULT_BEST_METRIC = {"single_label": "f1_macro", "multi_label": "f1_micro", "regression": "pearson"}
ALL_METRICS = tuple(dict.fromkeys(m for names in METRICS.values() for m in names))
REGRESSION_NAME = "score"  # the one output of a regression head, as id2label names it
DECISION_THRESHOLD = 0.5  # a multi-label class is predicted where its probability reaches this


def parse_multi_label(value: Any, separator: str, where: str) -> list[str]:
    """A multi-label cell: a list of names, or names joined by `separator`; empty means no label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        value = [part for part in (p.strip() for p in value.split(separator)) if part]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: labels {value!r} are neither a list nor a {separator!r}-separated string")
    names = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, np.integer)) or not str(item).strip():
            raise ValueError(f"{where}: label {item!r} in {value!r} is not a name")
        names.append(str(item).strip())
    return names


def parse_number(value: Any, where: str) -> float:
    """A regression target: a finite number (a numeric string in csv)."""
    if isinstance(value, bool) or isinstance(value, np.bool_):
        raise ValueError(f"{where}: target {value!r} is a boolean, not a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: target {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: target {value!r} is missing or not finite")
    return number


def per_example_loss(task: str, logits: Any, labels: Any):
    """Evaluation's per-example loss (torch tensors): the unweighted loss of the task's head."""
    import torch.nn.functional as F

    if task == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=-1)
    if task == "regression":
        return (logits.squeeze(-1) - labels.float()) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def outputs(task: str, logits: np.ndarray, label_range: Any = None) -> np.ndarray:
    """What the head's logits mean: class probabilities (softmax, or a sigmoid per class) or the value
    (in the original unit where the run learnt its targets mapped from `label_range` onto 0-1)."""
    if task == "regression":
        return logits[:, 0] if label_range is None else to_range(logits[:, 0], label_range)
    if task == "multi_label":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)


def to_range(values: np.ndarray, label_range: Any) -> np.ndarray:
    """Values learnt on 0-1 back in the unit of `label_range` ([low, high])."""
    low, high = label_range
    return low + (high - low) * values


def score(task: str, labels: np.ndarray, logits: np.ndarray, names: list[str],
          thresholds: str = "fixed", label_range: Any = None, chosen: np.ndarray | None = None) -> dict[str, Any]:
    """The task's metrics of gathered logits against the labels; multi-label at the decision
    thresholds `thresholds` asks for (`fixed`, or tuned on these labels: `global`, `per_label`), or at
    thresholds already `chosen`, which the metrics record under "thresholds"; regression in the targets'
    own unit."""
    from peftlab import metrics

    values = outputs(task, logits, label_range)
    if task == "regression":
        return metrics.regression_metrics(labels if label_range is None else to_range(labels, label_range), values)
    if task == "multi_label":
        chosen = tuned_thresholds(labels, values, thresholds) if chosen is None else np.asarray(chosen)
        return metrics.multi_label_metrics(labels, values, values >= chosen, names) | {"thresholds": chosen.tolist()}
    return metrics.classification_metrics(labels, values.argmax(axis=-1), names, values)


CANDIDATE_THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)


def tuned_thresholds(labels: np.ndarray, probabilities: np.ndarray, mode: str) -> np.ndarray:
    """A decision threshold per label: 0.5 (`fixed`); the one candidate that maximises micro F1
    (`global`); or for each label the candidate that maximises its F1 (`per_label`). Ties go to the
    candidate nearest 0.5."""
    count = probabilities.shape[1]
    if mode == "fixed":
        return np.full(count, DECISION_THRESHOLD)
    labels = labels.astype(bool)
    by_closeness = CANDIDATE_THRESHOLDS[np.argsort(np.abs(CANDIDATE_THRESHOLDS - DECISION_THRESHOLD), kind="stable")]
    predicted = probabilities[None, :, :] >= by_closeness[:, None, None]  # candidates x texts x labels
    true_positive = (predicted & labels).sum(axis=1)
    f1 = 2 * true_positive / np.maximum(predicted.sum(axis=1) + labels.sum(axis=0), 1)  # per candidate and label
    if mode == "per_label":
        return by_closeness[f1.argmax(axis=0)]
    micro = 2 * true_positive.sum(axis=1) / np.maximum(predicted.sum(axis=(1, 2)) + labels.sum(), 1)
    return np.full(count, by_closeness[micro.argmax()])


def answer(task: str, values: np.ndarray, names: list[str],
           thresholds: list[float] | None = None) -> list[dict[str, Any]]:
    """One JSON-able answer per text from `outputs`: the best label and every probability; every label
    at or above its threshold (0.5 unless the run tuned them); or the value."""
    if task == "regression":
        return [{"score": float(v)} for v in values]
    if task == "multi_label":
        cut = np.full(len(names), DECISION_THRESHOLD) if thresholds is None else np.asarray(thresholds)
        return [{"labels": [n for n, p, t in zip(names, row, cut) if p >= t],
                 "probabilities": {n: float(p) for n, p in zip(names, row)}} for row in values]
    best = values.argmax(axis=-1)
    return [{"label": names[b], "score": float(p[b]), "probabilities": {n: float(v) for n, v in zip(names, p)}}
            for b, p in zip(best, values)]
