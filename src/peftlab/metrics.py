"""Classification metrics from gathered predictions (scikit-learn does the arithmetic)."""

from __future__ import annotations

from typing import Any

import numpy as np

LOWER_IS_BETTER = {"eval_loss"}


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy, F1 (binary for two classes, macro, weighted), precision, recall, report, confusion."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(names)))
    metrics: dict[str, Any] = {"accuracy": float(accuracy_score(labels, predictions))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predictions, labels=ids, average=average, zero_division=0)
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


def load_scorers() -> None:
    """Import scikit-learn's metrics now: the import takes 0.8 s on a 2-core CPU, and made inside the
    first evaluation it counted as evaluation time (a fifth of the evaluation time of a 2-epoch run)."""
    import sklearn.metrics  # noqa: F401


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def headline(metrics: dict[str, Any]) -> str:
    keys = ("eval_loss", "accuracy", "f1", "f1_macro")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
