"""Where a run's labelled texts come from and how they are read (`data:`): the source, columns, the
task's label shape, long texts, subsamples and the training order. Part of the run configuration
(config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from peftlab.typed_config import Strict


class DataConfig(Strict):
    """Where the labelled texts come from: a hub dataset or alias (`source`), or local files (`train_file`,
    optionally `eval_file`), never both. Every row is checked before a model loads."""

    source: str | None = None
    """Hub dataset name (`imdb`, `ag_news`) or an offline alias (`tweets`, `stsb`, `attack-tactics`,
    `reuters-r52`, `20newsgroups`, `imdb-train`: docs/data.md); or leave empty and give files."""
    hub_config: str | None = None
    """Hub dataset configuration (subset) name."""
    train_file: Path | None = None
    """Local csv / tsv / jsonl / parquet file with training rows."""
    eval_file: Path | None = None
    """Local file with evaluation rows; without it `eval_fraction` of the training rows is held out."""
    train_split: str = "train"
    """Hub split used for training."""
    eval_split: str | None = "test"
    """Hub split used for evaluation; null holds out `eval_fraction` of the train split."""
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of the training rows held out (stratified, seeded) for evaluation when there is no eval file or
    split."""
    text_column: str | None = None
    """Defaults to the source's own text column (`text` for files)."""
    text_pair_column: str | None = None
    """Second text of a pair (e.g. NLI hypothesis)."""
    label_column: str | None = None
    """Defaults to the source's own label column (`label` for files)."""
    task: Literal["single_label", "multi_label", "regression"] = "single_label"
    """What a label is: one class per text; `multi_label`: any number of classes per text (a list, or
    names joined by `label_separator`; none is allowed); `regression`: a number per text."""
    label_separator: str = ","
    """Multi-label cells given as text (csv, tsv): the character that separates a text's labels."""
    thresholds: Literal["fixed", "global", "per_label"] = "fixed"
    """Multi-label decision thresholds: `fixed` at 0.5; `global`: the one threshold, `per_label`: a
    threshold per label, that maximise F1 on the eval split at each evaluation (micro F1, or each
    label's F1), kept with the best evaluation and used by predict. Tuned on the split they are scored
    on, the metrics are then optimistic."""
    label_range: tuple[float, float] | None = None
    """Regression: the targets' scale `[low, high]` (e.g. `[0, 5]`). The model learns them mapped onto
    0-1 (a loss on the scale of a classification's, whatever the unit) and answers in the original
    unit; a target outside the range is an error."""
    labels: list[str] | None = None
    """Fixed label order; by default the sorted labels seen in training."""
    encoding: str = "utf-8"
    """Text encoding of csv / jsonl files (e.g. latin-1)."""
    n_train: int | None = Field(None, ge=1)
    """Stratified, seeded subsample of the training rows."""
    n_eval: int | None = Field(None, ge=1)
    """Stratified, seeded subsample of the evaluation rows."""
    seed: int = 42
    """Seed of subsampling and held-out splits (kept apart from `train.seed`, so seeds vary only training)."""
    long_texts: Literal["truncate", "head_tail", "chunks"] = "truncate"
    """Texts longer than `model.max_length` tokens: `truncate` keeps the first tokens; `head_tail` the
    first `head_tokens` and the last ones (Sun et al. 2019); `chunks` reads all of them in windows
    overlapping by `stride` tokens, each trained on with its text's label and combined per text
    (`chunk_pooling`) in evaluation and prediction, so every metric is per text. docs/long-documents.md."""
    head_tokens: int | None = Field(None, ge=1)
    """`head_tail`: tokens kept from the start (default a quarter of the window); the rest from the end."""
    stride: int | None = Field(None, ge=0)
    """`chunks`: tokens each window shares with the one before (default a quarter of `max_length`)."""
    max_chunks_per_doc: int | None = Field(None, ge=1)
    """`chunks`: train on at most this many windows of a text each epoch (drawn afresh each epoch), so
    long texts do not outweigh short ones; default all."""
    chunk_pooling: Literal["mean", "max", "logsumexp"] = "mean"
    """`chunks`: how a text's window logits combine into its one prediction."""
    calibration_fraction: float | None = Field(None, gt=0, lt=1)
    """Hold out this share of the eval split (seeded) to fit the temperature that calibrates the
    probabilities, and measure calibration on the rest; default: fit and measure on the whole eval split,
    which flatters the calibrated figures (docs/calibration.md)."""
    sampler: Literal["random", "balanced"] = "random"
    """Training order: `random` (each example once an epoch) or `balanced` (examples drawn with
    replacement, each class equally often: the rare classes over-sampled); an epoch keeps its length."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.source is None and self.train_file is None:
            raise ValueError("give data.source (hub dataset or alias) or data.train_file")
        if self.source is not None and (self.train_file or self.eval_file):
            raise ValueError("give either data.source or data.train_file/eval_file, not both")
        if self.eval_file is not None and self.train_file is None:
            raise ValueError("data.eval_file needs data.train_file")
        if self.label_range is not None:
            if self.task != "regression":
                raise ValueError(f"data.label_range scales regression targets; data.task is {self.task}")
            if not self.label_range[0] < self.label_range[1]:
                raise ValueError(f"data.label_range {list(self.label_range)}: low must be below high")
        return self
