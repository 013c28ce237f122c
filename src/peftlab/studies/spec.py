"""The typed study file: base config, variants, grid, seeds, baseline, metric, published reference figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from peftlab.tasks import ALL_METRICS
from peftlab.typed_config import Strict


class Resources(Strict):
    """What one run needs from a worker of the Ray backend (the local backend runs one run at a time)."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


# Metrics a paper prints in points (x100): every metric bounded by 1 in absolute value; the others
# (errors, losses) keep their own scale.
UNSCALED_METRICS = ("mse", "mae", "eval_loss")


class Reference(Strict):
    """Published figures from one source, set beside the study's own in the report."""

    source: str = Field(min_length=1)
    """Where they are published: authors, year, table, and whatever sets them apart (median of 5 seeds,
    started from another checkpoint)."""
    percent: bool = True
    """Figures in points, as papers print them (63.6 for a Matthews correlation of 0.636); `false`: on
    the metric's own scale. Errors and losses (mse, mae, eval_loss) are always on their own scale."""
    statistic: Literal["median", "mean"] = "median"
    """What the figures are over seeds (papers mostly give medians): the report compares this study's same."""
    figures: dict[str, dict[Literal[ALL_METRICS], float]]  # type: ignore[valid-type]
    """Cell label (`cola, lora`) or variant name (every cell of that variant) -> `{metric: value}`."""

    @model_validator(mode="after")
    def _in_range(self) -> Reference:
        bound = 100.0 if self.percent else 1.0
        for key, figures in self.figures.items():
            for metric, value in figures.items():
                if not math.isfinite(value) or (metric not in UNSCALED_METRICS and abs(value) > bound):
                    scale = ("in points (percent: true)" if self.percent
                             else "on the metric's own scale (percent: false)")
                    raise ValueError(f"figures.{key}.{metric}: {value} is out of range for a figure {scale}")
        return self


class StudySpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Directory name of the study under the base config's `output.dir`."""
    description: str | None = None
    base: Path | None = None
    """Base run config file, relative to the study file."""
    config: dict[str, Any] = {}
    """Inline config sections, merged over `base`."""
    variants: dict[str, dict[str, Any]] | list[dict[str, dict[str, Any]]] | None = None
    """Named sets of `section.key: value` changes (e.g. per-method learning rates), crossed with the grid;
    or a list of such groups, crossed with each other (tasks x methods): a cell takes one variant of each
    group, later groups overriding earlier ones on a shared key, and is labelled by their names joined."""
    grid: dict[str, list[Any]] = {}
    """`section.key: [values]`; every combination is a cell."""
    seeds: int | list[int] = Field(1)
    """Number of training seeds (42, 43, ...) or the seeds themselves."""
    baseline: str | dict[str, Any] | None = None
    """Cell the others are compared with: a cell label, a variant name or `section.key: value` pairs;
    default the first cell. Matching several cells (`full` in tasks x methods), each cell is compared with
    the one of them that differs from it least (the full fine-tuning cell of its own task)."""
    metric: Literal[ALL_METRICS] = "f1_macro"  # type: ignore[valid-type]
    """Headline metric of the report's comparisons and plots."""
    select: Literal["best", "final"] = "best"
    """Which evaluation of each run the report uses: the kept (best) checkpoint or the last epoch."""
    resources: Resources = Resources()
    """Per run, for `--backend ray`: `{cpu: 2, gpu: 1}`."""
    reference: list[Reference] = []
    """Published figures to set beside the study's own, in a table of the report: a list of
    `{source, figures: {cell label or variant name: {metric: value}}, percent, statistic}`. Checked when the study
    loads: every key must name a cell or a variant, every metric be one of that cell's task."""

    @field_validator("variants")
    @classmethod
    def _variant_groups(cls, variants: Any) -> Any:
        groups = variants if isinstance(variants, list) else [variants] if variants else []
        seen: set[str] = set()
        for number, group in enumerate(groups, 1):
            if not group:
                raise ValueError(f"variant group {number} is empty")
            repeated = seen & set(group)
            if repeated:
                raise ValueError(f"variant name(s) {', '.join(sorted(repeated))} in more than one group")
            seen |= set(group)
        return variants

    def variant_groups(self) -> list[dict[str, dict[str, Any]]]:
        if not self.variants:  # none, or `{}`
            return []
        return self.variants if isinstance(self.variants, list) else [self.variants]

    def seed_list(self) -> list[int]:
        return list(range(42, 42 + self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)
