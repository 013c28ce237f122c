"""Labels and splits: the label set of a run, each split's labels encoded for its task, the held-out
evaluation rows, seeded (stratified) subsamples, and the checks that need the whole split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftlab.config import DataConfig
from peftlab.data import Table, load_tables
from peftlab.errors import DataError
from peftlab.tasks import REGRESSION_NAME


@dataclass(frozen=True)
class Labels:
    names: list[str]
    task: str = "single_label"
    label_range: tuple[float, float] | None = None
    """Regression: the targets' `[low, high]`, mapped onto 0-1 for training (data.label_range)."""

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def encode(self, table: Table, role: str) -> np.ndarray:
        """Label ids (single-label), 0/1 rows (multi-label) or targets (regression); a label outside the
        set names its row."""
        if self.task == "regression":
            targets = np.asarray(table.labels, dtype=np.float64)
            if self.label_range is None:
                return targets.astype(np.float32)
            low, high = self.label_range
            outside = np.flatnonzero((targets < low) | (targets > high))
            if len(outside):
                raise DataError(f"{table.origin}: row {table.rows[outside[0]]}: target {targets[outside[0]]:g} is "
                                f"outside data.label_range [{low:g}, {high:g}]")
            return ((targets - low) / (high - low)).astype(np.float32)
        mapping = self.label2id
        multi = self.task == "multi_label"
        ids = np.zeros((len(table), len(self.names)), dtype=np.float32) if multi else np.empty(len(table), np.int64)
        for i, (value, row) in enumerate(zip(table.labels, table.rows)):
            for key in (map(str, value) if multi else [str(value)]):
                if key not in mapping:
                    seen = "never seen in training" if role == "eval" else "not in data.labels"
                    raise DataError(
                        f"{table.origin}: row {row}: label {key!r} is {seen} "
                        f"(known labels: {', '.join(self.names)})"
                    )
                if multi:
                    ids[i, mapping[key]] = 1.0
                else:
                    ids[i] = mapping[key]
        return ids


def derive_labels(train: Table, fixed: list[str] | None, task: str = "single_label",
                  label_range: tuple[float, float] | None = None) -> Labels:
    if task == "regression":
        if fixed is not None:
            raise DataError("data.labels names classes; data.task=regression has a number per text")
        return Labels([REGRESSION_NAME], task, label_range)
    if fixed is not None:
        if len(set(fixed)) != len(fixed):
            raise DataError(f"data.labels has duplicates: {fixed}")
        return Labels(list(fixed), task)
    values = {v for names in train.labels for v in names} if task == "multi_label" else set(train.labels)
    if all(isinstance(v, int) for v in values):
        return Labels([str(v) for v in sorted(values)], task)
    return Labels(sorted(str(v) for v in values), task)


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a seeded sample of size n whose class shares follow the population's."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * n / len(labels)
    take = np.floor(quotas).astype(int)
    # Largest remainders get the leftover places, so the total is exactly n.
    for i in np.argsort(-(quotas - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


@dataclass
class Splits:
    train: Table
    eval: Table
    labels: Labels
    train_ids: np.ndarray
    eval_ids: np.ndarray
    notes: dict[str, Any] = field(default_factory=dict)


def prepare_splits(cfg: DataConfig) -> Splits:
    """Load, validate, hold out, subsample; every bad row is reported before any training."""
    train, evaluation = load_tables(cfg)
    labels = derive_labels(train, cfg.labels, cfg.task, cfg.label_range)
    train_ids = labels.encode(train, "train")
    sample = stratified_sample if cfg.task == "single_label" else _random_sample  # classes to stratify by
    if evaluation is None:
        held_out = sample(train_ids, max(1, round(len(train) * cfg.eval_fraction)), cfg.seed)
        kept = np.setdiff1d(np.arange(len(train)), held_out)
        train, evaluation = train.take(kept), train.take(held_out)
        train_ids = train_ids[kept]
    eval_ids = labels.encode(evaluation, "eval")
    if cfg.n_train is not None:
        chosen = sample(train_ids, cfg.n_train, cfg.seed)
        train, train_ids = train.take(chosen), train_ids[chosen]
    if cfg.n_eval is not None:
        chosen = sample(eval_ids, cfg.n_eval, cfg.seed + 1)
        evaluation, eval_ids = evaluation.take(chosen), eval_ids[chosen]
    if cfg.task == "regression":
        if np.ptp(train_ids) == 0:
            raise DataError(f"{train.origin}: every training target is {train_ids[0]:g}; nothing to learn")
        return Splits(train, evaluation, labels, train_ids, eval_ids, notes=_data_notes(train, evaluation, train_ids))
    counts = train_ids.sum(axis=0) if cfg.task == "multi_label" else np.bincount(train_ids, minlength=len(labels.names))
    empty = [labels.names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(
            f"{train.origin}: class(es) {', '.join(map(repr, empty))} have no training examples"
            + (f" after subsampling to data.n_train={cfg.n_train}" if cfg.n_train else "")
        )
    if len(labels.names) < 2:
        raise DataError(f"{train.origin}: only one class ({labels.names[0]!r}); need at least two")
    return Splits(train, evaluation, labels, train_ids, eval_ids, notes=_data_notes(train, evaluation, train_ids))


def _random_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a seeded sample of size n (where there are no classes to stratify by)."""
    if n >= len(labels):
        return np.arange(len(labels))
    return np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])


def _data_notes(train: Table, evaluation: Table, train_ids: np.ndarray) -> dict[str, Any]:
    """Duplicates and leaks worth a warning, not an error."""
    first_label: dict[str, tuple] = {}
    duplicates = conflicts = 0
    for text, label in zip(train.texts, train_ids):
        label = tuple(np.atleast_1d(label).tolist())
        if text in first_label:
            duplicates += 1
            conflicts += int(first_label[text] != label)
        else:
            first_label[text] = label
    overlap = sum(text in first_label for text in evaluation.texts)
    return {"duplicate_train_texts": duplicates, "conflicting_train_labels": conflicts,
            "eval_texts_also_in_train": overlap}
