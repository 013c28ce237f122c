"""Classification metrics from gathered predictions (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

LOWER_IS_BETTER = {"eval_loss", "mse", "mae", "hamming_loss"}
# Scored from the positive class's probability: defined for two classes only.
BINARY_ONLY = {"roc_auc", "pr_auc"}


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, names: list[str],
                           probabilities: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, Matthews correlation, F1 (binary for two classes, macro,
    weighted), precision, recall, report, confusion; for two classes with `probabilities`, also the
    areas under the ROC and the precision-recall curve (what a rare positive class is judged by)."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        classification_report,
        confusion_matrix,
        matthews_corrcoef,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    ids = list(range(len(names)))
    metrics: dict[str, Any] = {"accuracy": float(accuracy_score(labels, predictions))}
    with warnings.catch_warnings():  # one class only in the eval split: scikit-learn warns, the score is defined
        warnings.simplefilter("ignore", UserWarning)
        metrics["balanced_accuracy"] = float(balanced_accuracy_score(labels, predictions))
        metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
    if len(names) == 2 and probabilities is not None:
        both = len(np.unique(labels)) == 2  # the areas need both classes among the labels
        positive = probabilities[:, 1]
        metrics["roc_auc"] = float(roc_auc_score(labels, positive)) if both else float("nan")
        metrics["pr_auc"] = float(average_precision_score(labels, positive)) if both else float("nan")
    # Averages over the classes among the labels or the predictions (scikit-learn's own default): a class
    # that an evaluation subset happens to lack is neither right nor wrong, and does not count as F1 0.
    present = np.union1d(labels, predictions).tolist()
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predictions, labels=present, average=average,
                                                     zero_division=0)
        metrics |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
    if len(names) == 2:  # positive class = id 1, the HF convention for binary tasks
        p, r, f, _ = precision_recall_fscore_support(labels, predictions, labels=ids, average="binary",
                                                     pos_label=1, zero_division=0)
        metrics |= {"precision": float(p), "recall": float(r), "f1": float(f)}
    else:
        metrics["f1"] = metrics["f1_macro"]
    metrics["per_class"] = classification_report(labels, predictions, labels=ids, target_names=names,
                                                  output_dict=True, zero_division=0)
    metrics["confusion_matrix"] = confusion_matrix(labels, predictions, labels=ids).tolist()
    return metrics


def multi_label_metrics(labels: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray,
                        names: list[str]) -> dict[str, Any]:
    """Several labels per text: F1 (micro, macro, weighted, per text), subset accuracy (every label of a
    text right), Hamming loss, per-label precision / recall / F1 / support, and the threshold-free
    macro ROC-AUC and average precision over the labels that have both outcomes."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        classification_report,
        hamming_loss,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels, predicted = labels.astype(int), predicted.astype(int)
    metrics: dict[str, Any] = {"subset_accuracy": float(accuracy_score(labels, predicted)),
                               "hamming_loss": float(hamming_loss(labels, predicted))}
    for average in ("micro", "macro", "weighted", "samples"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, average=average, zero_division=0)
        metrics |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
    both = [i for i in range(labels.shape[1]) if 0 < labels[:, i].sum() < len(labels)]
    metrics["roc_auc_macro"] = float(np.mean([roc_auc_score(labels[:, i], probabilities[:, i]) for i in both])) \
        if both else float("nan")
    metrics["average_precision_macro"] = float(np.mean(
        [average_precision_score(labels[:, i], probabilities[:, i]) for i in both])) if both else float("nan")
    metrics["per_class"] = classification_report(labels, predicted, target_names=names, output_dict=True,
                                                 zero_division=0)
    return metrics


def regression_metrics(targets: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """A number per text: Pearson and Spearman correlation, mean squared and absolute error, R²."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    constant = np.ptp(targets) == 0 or np.ptp(values) == 0  # correlation undefined
    return {"pearson": float("nan") if constant else float(pearsonr(targets, values)[0]),
            "spearman": float("nan") if constant else float(spearmanr(targets, values)[0]),
            "mse": float(mean_squared_error(targets, values)), "mae": float(mean_absolute_error(targets, values)),
            "r2": float(r2_score(targets, values))}


def load_scorers() -> None:
    """Import scikit-learn's metrics now: the import takes 0.8 s on a 2-core CPU, and made inside the
    first evaluation it counted as evaluation time (a fifth of the evaluation time of a 2-epoch run)."""
    import sklearn.metrics  # noqa: F401


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` beats `best`; an undefined score (NaN: a constant prediction's correlation) beats
    nothing, and anything beats it."""
    if best is None or (math.isnan(best) and not math.isnan(value)):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def headline(metrics: dict[str, Any]) -> str:
    keys = ("eval_loss", "accuracy", "f1", "f1_micro", "f1_macro", "pearson", "spearman", "mae")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
