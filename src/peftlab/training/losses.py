"""The training loss when it is not the model's own cross-entropy: class weights, focal loss.

The evaluation loss stays the model's plain cross-entropy, so that runs with and without weights
are scored alike."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from peftlab.config import TrainConfig
from peftlab.errors import ConfigError
from peftlab.metrics import BINARY_ONLY

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_against_labels(cfg: TrainConfig, names: list[str]) -> None:
    """Settings that name labels or need a number of them, checked once the labels are known (before
    any model loads)."""
    if isinstance(cfg.class_weights, dict):
        unknown = sorted(set(cfg.class_weights) - set(names))
        if unknown:
            raise ConfigError(f"train.class_weights: {', '.join(map(repr, unknown))} is not a label of this data "
                              f"(labels: {', '.join(names)})")
    if cfg.best_metric in BINARY_ONLY and len(names) != 2:
        raise ConfigError(f"train.best_metric={cfg.best_metric} needs two classes; this data has {len(names)} "
                          "(use f1_macro, balanced_accuracy or mcc)")


def class_weights(cfg: TrainConfig, names: list[str], train_labels: np.ndarray,
                  task: str = "single_label") -> torch.Tensor | None:
    """Single-label: a weight per class. Multi-label: each label's weight of its positives against its
    negatives (`pos_weight`); `balanced` gives negatives / positives, so both sides weigh alike."""
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights == "balanced" and task == "multi_label":
        positives = train_labels.sum(axis=0).astype(np.float64)
        weights = (len(train_labels) - positives) / np.maximum(positives, 1)
    elif cfg.class_weights == "balanced":
        counts = np.bincount(train_labels, minlength=len(names)).astype(np.float64)
        weights = len(train_labels) / (len(names) * np.maximum(counts, 1))
    else:
        weights = np.array([cfg.class_weights.get(name, 1.0) for name in names], dtype=np.float64)
    return torch.tensor(weights, dtype=torch.float32)


def training_loss(cfg: TrainConfig, names: list[str], train_labels: np.ndarray,
                  task: str = "single_label") -> LossFunction | None:
    """The loss of (logits, labels) the config asks for; None: the model's own (cross-entropy, binary
    cross-entropy for multi-label, squared error for regression)."""
    weights = class_weights(cfg, names, train_labels, task)
    if weights is None and cfg.loss == "cross_entropy":
        return None
    if task == "multi_label":
        gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0
        return lambda logits, labels: _binary_focal(logits.float(), labels.float(), gamma,
                                                    None if weights is None else weights.to(logits.device))
    if cfg.loss == "cross_entropy":
        return lambda logits, labels: F.cross_entropy(logits.float(), labels, weight=weights.to(logits.device))
    gamma = cfg.focal_gamma

    def focal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** gamma) * log_p
        if weights is None:
            return loss.mean()
        alpha = weights.to(logits.device)[labels]
        return (alpha * loss).sum() / alpha.sum()  # as weighted cross-entropy averages

    return focal


def _binary_focal(logits: torch.Tensor, labels: torch.Tensor, gamma: float,
                  pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Binary cross-entropy per label (positives weighed by `pos_weight`), scaled by (1 - p_true)^gamma:
    at gamma 0 exactly torch's BCEWithLogits."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight, reduction="none")
    if gamma:
        p_true = torch.where(labels > 0.5, torch.sigmoid(logits), torch.sigmoid(-logits))
        loss = (1 - p_true) ** gamma * loss
    return loss.mean()
