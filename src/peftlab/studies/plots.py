"""The report's figures (matplotlib, written as PNG files)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from peftlab.studies.results import Configuration, ResultSet, RunResult

_NAMES = {"f1_macro": "macro F1", "f1": "F1", "accuracy": "accuracy", "eval_loss": "eval loss",
          "f1_weighted": "weighted F1", "precision_macro": "macro precision", "recall_macro": "macro recall",
          "f1_micro": "micro F1", "f1_samples": "per-text F1", "subset_accuracy": "subset accuracy",
          "hamming_loss": "Hamming loss", "pearson": "Pearson r", "spearman": "Spearman ρ", "mse": "MSE", "mae": "MAE",
          "r2": "R²", "balanced_accuracy": "balanced accuracy", "mcc": "Matthews correlation", "roc_auc": "ROC-AUC",
          "pr_auc": "PR-AUC", "roc_auc_macro": "macro ROC-AUC", "average_precision_macro": "macro average precision",
          "ece": "ECE", "ece_calibrated": "ECE calibrated", "accuracy_long": "accuracy (long texts)",
          "f1_macro_long": "macro F1 (long texts)", "f1_micro_long": "micro F1 (long texts)",
          "pearson_long": "Pearson r (long texts)", "mae_long": "MAE (long texts)"}


def metric_name(metric: str) -> str:
    return _NAMES.get(metric, metric)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here, and none needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _colors(n: int) -> list:
    cmap = _pyplot().get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def quality_vs_cost(results: ResultSet, cost: str, path: Path) -> Path:
    """Metric (mean, error bar = std over seeds) against trainable parameters or train time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    scored = results.scored()  # a regression among classifications has no accuracy to plot
    for color, configuration in zip(_colors(len(scored)), scored):
        quality = configuration.stat(results.metric, results.select)
        spent = configuration.cost(cost)
        ax.errorbar(spent.mean, quality.mean, yerr=_nan_to_zero(quality.std),
                    xerr=_nan_to_zero(spent.std) if cost != "trainable_params" else None,
                    fmt="o", color=color, capsize=4, label=configuration.label)
        ax.annotate(configuration.label, (spent.mean, quality.mean), textcoords="offset points", xytext=(6, 6),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)" if cost == "trainable_params" else "train time, s (log scale)")
    ax.set_ylabel(f"{metric_name(results.metric)} (mean ± std over seeds)")
    ax.set_title(f"{metric_name(results.metric)} against "
                 f"{'trainable parameters' if cost == 'trainable_params' else 'train time'}")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def learning_curves(results: ResultSet, path: Path) -> Path:
    """Train loss, eval loss and the metric per epoch: mean line, band = min..max over seeds."""
    plt = _pyplot()
    panels = [("train_loss", "train loss"), ("eval_loss", "eval loss"), (results.metric, metric_name(results.metric))]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for color, configuration in zip(_colors(len(results.configurations)), results.configurations):
        for ax, (key, _) in zip(axes, panels):
            x, values = _aligned_history(configuration.runs, key)
            if not len(x):
                continue
            ax.plot(x, values.mean(axis=0), marker="o", color=color, label=configuration.label)
            if values.shape[0] > 1:
                ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=8)
    return _save(fig, path)


def _aligned_history(runs: list[RunResult], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Evaluations of the seeds at the same steps (seeds share the schedule); x in epochs."""
    rows = [[(r["step"], r.get(key)) for r in run.history if r.get(key) is not None] for run in runs]
    length = min((len(row) for row in rows), default=0)
    if not length:
        return np.array([]), np.array([[]])
    steps_per_epoch = max(runs[0].summary["steps"] / max(runs[0].summary["epochs_run"], 1), 1)
    x = np.array([step for step, _ in rows[0][:length]]) / steps_per_epoch
    return x, np.array([[value for _, value in row[:length]] for row in rows], dtype=float)


def confusion(run: RunResult, select: str, labels: list[str], title: str, path: Path) -> Path:
    plt = _pyplot()
    matrix = np.array(run.evaluation(select)["confusion_matrix"])
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def sweep_curve(results: ResultSet, key: str, path: Path) -> Path | None:
    """Metric against one swept key (rank, data size): one line per combination of the other keys;
    configurations without the key (full fine-tuning in a rank sweep) are dashed reference lines."""
    others = [k for k in results.varying if k != key and not _follows(results, k, key)]
    series: dict[str, list[tuple[float, Configuration]]] = {}
    references: list[Configuration] = []
    for configuration in results.scored():
        value = configuration.changes.get(key)
        if value is None:
            references.append(configuration)
            continue
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={configuration.changes.get(k)}" for k in others
                         if configuration.changes.get(k) is not None) or "runs"
        series.setdefault(name, []).append((float(value), configuration))
    if not any(len(points) > 1 for points in series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors(len(series) + len(references))
    for color, (name, points) in zip(colors, series.items()):
        points.sort(key=lambda p: p[0])
        stats = [c.stat(results.metric, results.select) for _, c in points]
        ax.errorbar([x for x, _ in points], [s.mean for s in stats], yerr=[_nan_to_zero(s.std) for s in stats],
                    marker="o", capsize=4, color=color, label=name)
    for color, configuration in zip(colors[len(series):], references):
        ax.axhline(configuration.stat(results.metric, results.select).mean, linestyle="--", color=color,
                   label=configuration.label)
    short = key.rsplit(".", 1)[-1]
    ax.set_xscale("log", base=2 if short in ("r", "max_length") else 10)
    ax.set_xlabel({"r": "LoRA rank r", "n_train": "training examples", "max_length": "max_length (tokens a window)"}
                  .get(short, short) + " (log scale)")
    ax.set_ylabel(f"{metric_name(results.metric)} (mean ± std)")
    ax.set_title(f"{metric_name(results.metric)} against {short}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _follows(results: ResultSet, other: str, key: str) -> bool:
    """Whether `other` is set by `key` wherever both are set (data.stride and data.head_tokens default to
    a share of model.max_length): a series per value of it would split every line into points."""
    seen: dict = {}
    for configuration in results.scored():
        value, own = configuration.changes.get(key), configuration.changes.get(other)
        if value is not None and own is not None and seen.setdefault(value, own) != own:
            return False
    return True


def _nan_to_zero(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def reliability(run: RunResult, select: str, title: str, path: Path) -> Path | None:
    """Reliability diagram (accuracy against confidence per bin, before and after calibration) and
    accuracy against coverage, of one run's evaluation."""
    evaluation = run.evaluation(select)
    bins = evaluation.get("reliability")
    if not bins:
        return None
    plt = _pyplot()
    coverage = evaluation.get("coverage_accuracy")
    fig, axes = plt.subplots(1, 2 if coverage else 1, figsize=(9 if coverage else 4.6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for name, color in (("raw", "tab:red"), ("calibrated", "tab:blue")):
        part = bins[name]
        ece = evaluation.get("ece" if name == "raw" else "ece_calibrated", float("nan"))
        ax.plot(part["confidence"], part["accuracy"], marker="o", color=color, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (mean probability in the bin)")
    ax.set_ylabel("accuracy (frequency in the bin)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    if coverage:
        ax = axes[0][1]
        ax.plot(coverage["coverage"], coverage["accuracy"], marker=".", color="tab:blue")
        ax.set_xlabel("coverage (share of texts answered, most confident first)")
        ax.set_ylabel("accuracy on the answered texts")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title("accuracy against coverage (calibrated)", fontsize=10)
    return _save(fig, path)
