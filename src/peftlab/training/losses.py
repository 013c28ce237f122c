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


def class_weights(cfg: TrainConfig, names: list[str], train_labels: np.ndarray) -> torch.Tensor | None:
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights == "balanced":
        counts = np.bincount(train_labels, minlength=len(names)).astype(np.float64)
        weights = len(train_labels) / (len(names) * np.maximum(counts, 1))
    else:
        weights = np.array([cfg.class_weights.get(name, 1.0) for name in names], dtype=np.float64)
    return torch.tensor(weights, dtype=torch.float32)


def training_loss(cfg: TrainConfig, names: list[str], train_labels: np.ndarray) -> LossFunction | None:
    """The loss of (logits, labels) the config asks for; None: the model's own cross-entropy."""
    weights = class_weights(cfg, names, train_labels)
    if weights is None and cfg.loss == "cross_entropy":
        return None
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
