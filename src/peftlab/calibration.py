"""Probabilities that mean what they say: temperature scaling fitted on held-out logits (Guo et al.
2017, *On Calibration of Modern Neural Networks*), and the two measures of calibration, expected
calibration error (15 equal-width bins) and the Brier score, before and after it.

One temperature divides every logit of a single-label head (the predicted class never changes); a
multi-label head gets one per label. Regression has no probabilities to calibrate."""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # searched on a log scale


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _fit_one(nll) -> float:
    from scipy.optimize import minimize_scalar

    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: nll(np.exp(log_t)), bounds=(low, high), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))


def fit_temperature(task: str, labels: np.ndarray, logits: np.ndarray) -> list[float]:
    """The temperature(s) minimising the negative log-likelihood of `labels` (one, or one per label)."""
    logits = logits.astype(np.float64)
    if task == "multi_label":
        def label_nll(column: int):
            x, y = logits[:, column], labels[:, column]
            return lambda t: float(np.mean(np.logaddexp(0.0, x / t) - y * x / t))
        return [_fit_one(label_nll(c)) for c in range(logits.shape[1])]
    rows = np.arange(len(labels))

    def nll(t: float) -> float:
        scaled = logits / t
        top = scaled.max(axis=-1)
        return float(np.mean(top + np.log(np.exp(scaled - top[:, None]).sum(axis=-1)) - scaled[rows, labels]))
    return [_fit_one(nll)]


def probabilities(task: str, logits: np.ndarray, temperature: list[float] | None = None) -> np.ndarray:
    """Softmax (or a sigmoid per label) of the logits divided by the temperature(s)."""
    scale = 1.0 if temperature is None else np.asarray(temperature, dtype=np.float64)
    scaled = logits / scale
    return _sigmoid(scaled) if task == "multi_label" else _softmax(scaled)


def _confidence(task: str, labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-label: the top class's probability and whether it is right; multi-label: every (text,
    label) probability and whether the label is on."""
    if task == "multi_label":
        return probs.ravel(), labels.ravel().astype(np.float64)
    return probs.max(axis=-1), (probs.argmax(axis=-1) == labels).astype(np.float64)


def reliability(task: str, labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Per non-empty equal-width confidence bin: its mean confidence, accuracy (or frequency) and count."""
    confidence, correct = _confidence(task, labels, probs)
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True), 0, bins - 1)
    out: dict[str, list] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        inside = which == b
        if inside.any():
            out["confidence"].append(float(confidence[inside].mean()))
            out["accuracy"].append(float(correct[inside].mean()))
            out["count"].append(int(inside.sum()))
    return out


def expected_calibration_error(task: str, labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """|accuracy - confidence| per bin (reliability), weighted by the bin's share of the predictions."""
    table = reliability(task, labels, probs, bins)
    total = sum(table["count"])
    return float(sum(n / total * abs(a - c) for n, a, c in zip(table["count"], table["accuracy"], table["confidence"])))


def brier_score(task: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared distance of the probabilities from the truth (one-hot; per label for multi-label)."""
    if task == "multi_label":
        return float(np.mean((probs - labels) ** 2))
    truth = np.zeros_like(probs)
    truth[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(((probs - truth) ** 2).sum(axis=-1)))


def calibration_split(count: int, fraction: float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows the temperature is fitted on and rows calibration is measured on: all and all, or a seeded
    `fraction` held out for fitting and the rest for measuring (data.calibration_fraction)."""
    every = np.arange(count)
    if not fraction:
        return every, every
    held = np.random.default_rng([seed, 17]).permutation(count)[: max(1, round(fraction * count))]
    return np.sort(held), np.setdiff1d(every, held)


def calibrate(task: str, labels: np.ndarray, logits: np.ndarray, fraction: float | None = None,
              seed: int = 0) -> dict[str, Any]:
    """The temperature(s) fitted on the eval split (or its held-out `fraction`), with ECE and Brier
    score before and after, measured on the other rows (all rows when nothing is held out)."""
    if task == "regression" or not len(labels):
        return {}
    fit_rows, measure_rows = calibration_split(len(labels), fraction, seed)
    temperature = fit_temperature(task, labels[fit_rows], logits[fit_rows])
    y, x = labels[measure_rows], logits[measure_rows]
    raw, scaled = probabilities(task, x), probabilities(task, x, temperature)
    found = {"temperature": temperature,
             "ece": expected_calibration_error(task, y, raw), "ece_calibrated": expected_calibration_error(task, y, scaled),
             "brier": brier_score(task, y, raw), "brier_calibrated": brier_score(task, y, scaled),
             "reliability": {"raw": reliability(task, y, raw), "calibrated": reliability(task, y, scaled)}}
    if task == "single_label":
        found["coverage_accuracy"] = coverage_accuracy(y, scaled)
    return found


def coverage_accuracy(labels: np.ndarray, probs: np.ndarray, points: int = 20) -> dict[str, list[float]]:
    """Accuracy on the texts answered when those whose top probability is lowest are left out: at
    coverage c the most confident share c of the texts (what `peftlab predict --abstain-below` trades)."""
    order = np.argsort(-probs.max(axis=-1), kind="stable")
    correct = (probs.argmax(axis=-1) == labels)[order]
    coverage = np.linspace(1.0 / points, 1.0, points)
    answered = np.maximum(1, np.round(coverage * len(labels)).astype(int))
    accuracy = np.cumsum(correct)[answered - 1] / answered
    return {"coverage": coverage.round(4).tolist(), "accuracy": accuracy.astype(float).tolist()}
