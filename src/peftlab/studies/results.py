"""Finished runs gathered into configurations (same experiment, several seeds) with their statistics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlab.config_loading import with_defaults
from peftlab.metrics import LOWER_IS_BETTER
from peftlab.runs import (
    CONFIG,
    INCOMPLETE,
    SUMMARY,
    RunError,
    is_finished,
    read_metrics,
)
from peftlab.studies.stats import Comparison, Summary, paired_comparison, summarize
from peftlab.studies.study import STUDY_FILE, change_label

_NOT_IDENTITY = ("output.", "train.seed")


@dataclass
class RunResult:
    path: Path
    config: dict[str, Any]  # flattened `section.key` -> value
    summary: dict[str, Any]
    history: list[dict[str, Any]]  # the eval records of metrics.jsonl, in order

    @property
    def seed(self) -> int:
        return int(self.config["train.seed"])

    def evaluation(self, select: str) -> dict[str, Any]:
        return self.summary.get(select) or self.summary["best"]


@dataclass
class Configuration:
    label: str
    runs: list[RunResult]
    changes: dict[str, Any] = field(default_factory=dict)  # the keys that set it apart from the others

    def has(self, metric: str, select: str) -> bool:
        """Whether every run has the metric (a regression has no accuracy)."""
        return all(run.evaluation(select).get(metric) is not None for run in self.runs)

    def values(self, metric: str, select: str) -> dict[int, float]:
        return {run.seed: float(run.evaluation(select)[metric]) for run in self.runs}

    @property
    def best_metric(self) -> str | None:
        """The metric its runs kept their checkpoint by (`train.best_metric`): the task's own."""
        return self.runs[0].config.get("train.best_metric")

    def stat(self, metric: str, select: str) -> Summary:
        return summarize(list(self.values(metric, select).values()))

    def cost(self, key: str) -> Summary:
        return summarize([float(run.summary[key]) for run in self.runs if run.summary.get(key) is not None])


@dataclass
class ResultSet:
    """What a report or a comparison shows."""

    title: str
    configurations: list[Configuration]
    metric: str = "f1_macro"
    select: str = "best"
    baseline: str | None = None
    varying: list[str] = field(default_factory=list)  # config keys that differ between configurations
    unfinished: list[Path] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    baselines: dict[str, str] = field(default_factory=dict)  # configuration label -> its own baseline's label
    # configuration label -> {metric: {"value": published value on the metric's scale, "source": ...}}
    references: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def baseline_configuration(self) -> Configuration:
        for configuration in self.configurations:
            if configuration.label == self.baseline:
                return configuration
        return self.configurations[0]

    def baseline_of(self, configuration: Configuration) -> Configuration | None:
        """A configuration's own baseline where the study gives each cell one (the full fine-tuning of its
        task), None if that one has no finished runs; else the baseline."""
        if configuration.label not in self.baselines:
            return self.baseline_configuration()
        return next((c for c in self.configurations if c.label == self.baselines[configuration.label]), None)

    @property
    def several_baselines(self) -> bool:
        return len({self.baselines.get(c.label, self.baseline) for c in self.configurations}) > 1

    def comparisons(self, metric: str | None = None) -> dict[str, Comparison | None]:
        """Each configuration but a baseline against its baseline, paired by seed; None where one of the
        two has no such metric, or its own baseline has no finished runs."""
        metric = metric or self.metric
        higher = metric not in LOWER_IS_BETTER
        compared: dict[str, Comparison | None] = {}
        for c in self.configurations:
            base = self.baseline_of(c)
            if base is c:
                continue
            both = base is not None and c.has(metric, self.select) and base.has(metric, self.select)
            compared[c.label] = paired_comparison(c.values(metric, self.select), base.values(metric, self.select),
                                                  higher) if both else None
        return compared

    def scored(self) -> list[Configuration]:
        """The configurations that have the headline metric."""
        return [c for c in self.configurations if c.has(self.metric, self.select)]

    def best_run(self) -> RunResult:
        sign = 1 if self.higher_is_better else -1
        if not self.scored():
            return self.configurations[0].runs[0]
        best = max(self.scored(), key=lambda c: sign * c.stat(self.metric, self.select).mean)
        return max(best.runs, key=lambda r: sign * float(r.evaluation(self.select)[self.metric]))


# --------------------------------------------------------------------------- collecting


def collect(paths: list[Path]) -> ResultSet:
    """Runs from run directories and study directories (any directory holding finished runs)."""
    runs: list[RunResult] = []
    unfinished: list[Path] = []
    study: dict[str, Any] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise RunError(f"{path} is not a directory")
        if is_finished(path):
            runs.append(load_result(path))
            continue
        if (path / STUDY_FILE).is_file() and len(paths) == 1:
            study = json.loads((path / STUDY_FILE).read_text(encoding="utf-8"))
        children = sorted(p for p in path.iterdir() if p.is_dir())
        runs += [load_result(child) for child in children if is_finished(child)]
        unfinished += [child for child in children if child.name.endswith(INCOMPLETE)]
    if not runs:
        raise RunError(f"no finished runs in {', '.join(map(str, paths))}")
    configurations, varying = group(runs, study)
    title = study.get("name") or (Path(paths[0]).name if len(paths) == 1 else "comparison")
    cells = study.get("cells", [])
    return ResultSet(title=title, configurations=configurations, metric=study.get("metric", "f1_macro"),
                     select=study.get("select", "best"), baseline=study.get("baseline"), varying=varying,
                     unfinished=unfinished, failures=study.get("failures", {}), description=study.get("description"),
                     baselines={c["label"]: c["baseline"] for c in cells if c.get("baseline")},
                     references={c["label"]: c["reference"] for c in cells if c.get("reference")})


def load_result(path: Path) -> RunResult:
    # Read with today's defaults, so runs made before a key existed group with those made after.
    config = with_defaults(yaml.safe_load((path / CONFIG).read_text(encoding="utf-8")))
    summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    history = [r for r in read_metrics(path) if r.get("type") == "eval"]
    return RunResult(path, flatten(config), summary, history)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and not (prefix == "method." and key == "options"):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def group(runs: list[RunResult], study: dict[str, Any]) -> tuple[list[Configuration], list[str]]:
    """Runs that differ only by seed form one configuration; labels come from the study, or else from
    the config keys that vary between configurations."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        identity = json.dumps({k: v for k, v in run.config.items() if not k.startswith(_NOT_IDENTITY)},
                              sort_keys=True, default=str)
        groups.setdefault(identity, []).append(run)
    members = [sorted(g, key=lambda r: r.seed) for g in groups.values()]
    varying = _varying_keys([g[0].config for g in members])
    study_labels = {run: cell["label"] for cell in study.get("cells", []) for run in cell["runs"]}
    study_order = {cell["label"]: i for i, cell in enumerate(study.get("cells", []))}
    configurations = []
    for runs_of_group in members:
        changes = {key: runs_of_group[0].config.get(key) for key in varying}
        label = study_labels.get(runs_of_group[0].path.name) or change_label(changes) or "all runs"
        configurations.append(Configuration(label, runs_of_group, changes))
    configurations.sort(key=lambda c: (study_order.get(c.label, math.inf), c.label))
    return configurations, varying


def _varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys = sorted(set().union(*configs), key=lambda k: (not k.startswith("method.kind"), k))
    return [k for k in keys if not k.startswith(_NOT_IDENTITY)
            and len({json.dumps(c.get(k), default=str) for c in configs}) > 1]

