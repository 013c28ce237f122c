"""A study: one base config, a grid of changes, several seeds; every cell an ordinary run directory."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from peftlab.config import RunConfig
from peftlab.config_loading import (
    apply_overrides,
    config_differences,
    parse_overrides,
    parse_yaml,
    read_yaml,
    validate_config,
)
from peftlab.errors import ConfigError, StudyError
from peftlab.method_configs import METHOD_CLASSES
from peftlab.runs import CONFIG, atomic_write_json, is_finished
from peftlab.tasks import ALL_METRICS
from peftlab.typed_config import Strict

STUDY_FILE = "study.json"
_METHOD_KEYS = set().union(*(cls.model_fields for cls in METHOD_CLASSES.values()))


class Resources(Strict):
    """What one run needs from a worker of the Ray backend (the local backend runs one run at a time)."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class StudySpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Directory name of the study under the base config's `output.dir`."""
    description: str | None = None
    base: Path | None = None
    """Base run config file, relative to the study file."""
    config: dict[str, Any] = {}
    """Inline config sections, merged over `base`."""
    variants: dict[str, dict[str, Any]] | None = None
    """Named sets of `section.key: value` changes (e.g. per-method learning rates), crossed with the grid."""
    grid: dict[str, list[Any]] = {}
    """`section.key: [values]`; every combination is a cell."""
    seeds: int | list[int] = Field(1)
    """Number of training seeds (42, 43, ...) or the seeds themselves."""
    baseline: str | dict[str, Any] | None = None
    """Cell the others are compared with: a cell label, or `section.key: value` pairs; default the first cell."""
    metric: Literal[ALL_METRICS] = "f1_macro"  # type: ignore[valid-type]
    """Headline metric of the report's comparisons and plots."""
    select: Literal["best", "final"] = "best"
    """Which evaluation of each run the report uses: the kept (best) checkpoint or the last epoch."""
    resources: Resources = Resources()
    """Per run, for `--backend ray`: `{cpu: 2, gpu: 1}`."""

    def seed_list(self) -> list[int]:
        return list(range(42, 42 + self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


@dataclass
class Cell:
    """One configuration of the grid; run once per seed."""

    label: str
    slug: str
    changes: dict[str, Any]
    config: RunConfig  # with the first seed; `config_for(seed)` gives the others


@dataclass
class PlannedRun:
    cell: Cell
    seed: int
    config: RunConfig

    @property
    def path(self) -> Path:
        return Path(self.config.output.dir) / str(self.config.output.name)


@dataclass
class Study:
    spec: StudySpec
    origin: Path
    directory: Path
    cells: list[Cell]
    collapsed: int  # grid combinations that duplicated another cell once inapplicable keys were dropped

    @cached_property
    def runs(self) -> list[PlannedRun]:
        return [PlannedRun(cell, seed, _with_seed(cell.config, seed, self.directory, cell.slug))
                for cell in self.cells for seed in self.spec.seed_list()]

    def baseline_label(self) -> str:
        wanted = self.spec.baseline
        if wanted is None:
            return self.cells[0].label
        for cell in self.cells:
            if wanted == cell.label or (isinstance(wanted, dict) and _matches(cell.config, wanted)):
                return cell.label
        raise StudyError(f"{self.origin}: baseline {wanted!r} matches no cell "
                         f"(cells: {' | '.join(c.label for c in self.cells)})")


# --------------------------------------------------------------------------- loading and expanding


def read_spec(kind: type[Strict], path: Path, overrides: list[str] | None) -> tuple[Any, dict[str, Any]]:
    """A study-like file (`base` + `config` + its own keys) validated as `kind`, and its base config.
    An override changes the file's own key if it has one (`seeds=2`), else the base config."""
    raw = read_yaml(path)
    own, config_overrides = {}, {}
    for key, value in parse_overrides(overrides or []).items():
        (own if key in kind.model_fields else config_overrides)[key] = value
    try:
        spec = kind.model_validate({**raw, **own})
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise StudyError(f"{path}: {len(problems)} problem(s)\n  " + "\n  ".join(problems)) from None
    base = merge_configs(read_yaml(path.parent / spec.base) if spec.base else {}, spec.config)
    return spec, apply_overrides(base, config_overrides)


def load_study(path: Path | str, overrides: list[str] | None = None) -> Study:
    """Read, validate and expand a study file; `overrides` change the study (`seeds=2`) or the base config."""
    path = Path(path)
    spec, base = read_spec(StudySpec, path, overrides)
    study = expand(spec, base, path)
    study.baseline_label()  # an unmatched baseline fails now, not after the runs
    return study


def expand(spec: StudySpec, base: dict[str, Any], origin: Path) -> Study:
    """Every variant × grid combination, with keys that do not apply to a cell's method dropped, and
    combinations that then coincide collapsed into one cell. All configs are validated here, before
    any run starts."""
    for key, values in spec.grid.items():
        if not values:
            raise StudyError(f"{origin}: grid.{key} has no values")
    variants = list((spec.variants or {None: {}}).items())
    keys = list(spec.grid)
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    collapsed = 0
    problems = []
    for (variant, variant_changes), values in itertools.product(variants, itertools.product(*spec.grid.values())):
        changes = {**variant_changes, **dict(zip(keys, values))}
        raw = apply_overrides(base, changes)
        dropped = _drop_inapplicable_method_keys(raw)
        grid_changes = {k: v for k, v in zip(keys, values) if k.removeprefix("method.") not in dropped}
        label = _label(variant, grid_changes)
        try:
            config = validate_config(raw, origin=f"{origin} cell {label}")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        identity = _identity(config)
        if identity in seen:
            collapsed += 1
            continue
        seen[identity] = label
        cells.append(Cell(label, _slug(label), {**({"variant": variant} if variant else {}), **grid_changes}, config))
    if problems:
        raise ConfigError("\n".join(problems))
    _make_slugs_unique(cells)
    base_output = cells[0].config.output if cells else None
    directory = Path(base_output.dir if base_output else "runs") / spec.name
    return Study(spec, origin, directory, cells, collapsed)


def merge_configs(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, section by section."""
    merged = dict(base)
    for key, value in extra.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge_configs(merged[key], value) if both_sections else value
    return merged


def _drop_inapplicable_method_keys(raw: dict[str, Any]) -> set[str]:
    """`method.r` means nothing for full fine-tuning: drop keys of other method kinds (unknown keys stay,
    so that typos still fail validation)."""
    method = raw.get("method")
    if not isinstance(method, dict):
        return set()
    allowed = METHOD_CLASSES.get(method.get("kind", "lora"))
    if allowed is None:
        return set()
    dropped = {key for key in method if key in _METHOD_KEYS and key not in allowed.model_fields}
    for key in dropped:
        del method[key]
    return dropped


def _identity(config: RunConfig) -> str:
    """What makes two runs the same experiment: everything but the seed and where it is written."""
    data = config.model_dump(mode="json")
    data.pop("output")
    data["train"].pop("seed")
    return json.dumps(data, sort_keys=True)


def _label(variant: str | None, changes: dict[str, Any]) -> str:
    return ", ".join(part for part in (variant, change_label(changes)) if part) or "base"


def change_label(changes: dict[str, Any]) -> str:
    """`{"method.kind": "lora", "method.r": 8}` -> `lora, r=8` (keys that do not apply are None)."""
    parts = []
    for key, value in changes.items():
        if value is None:
            continue
        shown = "+".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(shown if key == "method.kind" else f"{key.rsplit('.', 1)[-1]}={shown}")
    return ", ".join(parts)


def _slug(label: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.+_-]+", "-", label.replace(", ", "_").replace("=", "")).strip("-")
    if len(slug) > 60:
        slug = slug[:50] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return slug


def _make_slugs_unique(cells: list[Cell]) -> None:
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.slug] = counts.get(cell.slug, 0) + 1
    for cell in cells:
        if counts[cell.slug] > 1:
            cell.slug += "-" + hashlib.sha1(cell.label.encode()).hexdigest()[:6]


def _with_seed(config: RunConfig, seed: int, directory: Path, slug: str) -> RunConfig:
    data = config.model_dump()
    data["train"]["seed"] = seed
    # A study never overwrites a finished run: it skips it.
    data["output"] |= {"dir": directory, "name": f"{slug}-seed{seed}", "overwrite": False}
    return RunConfig.model_validate(data)


def _matches(config: RunConfig, wanted: dict[str, Any]) -> bool:
    data = config.model_dump(mode="json")
    for dotted, value in wanted.items():
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value and not (isinstance(value, str) and node == parse_yaml(value)):
            return False
    return True


# --------------------------------------------------------------------------- running


def check_finished_runs(study: Study) -> None:
    """A finished run made with another config would be silently reused: refuse, naming the keys."""
    for planned in study.runs:
        if not is_finished(planned.path):
            continue
        saved = yaml.safe_load((planned.path / CONFIG).read_text(encoding="utf-8"))
        expected = planned.config.model_dump(mode="json")
        differences = config_differences(saved, expected)
        if differences:
            raise StudyError(f"{planned.path} was made with a different config ({'; '.join(differences[:5])}); "
                             f"give the study another name, or remove that run to redo it")


def describe(study: Study) -> str:
    """The plan: one line per run, marked done / to do."""
    runs = study.runs
    done = sum(is_finished(r.path) for r in runs)
    header = (f"study {study.spec.name}: {len(study.cells)} configurations × {len(study.spec.seed_list())} seeds = "
              f"{len(runs)} runs ({done} finished, {len(runs) - done} to run) in {study.directory}")
    lines = [header]
    if study.collapsed:
        lines.append(f"  {study.collapsed} grid combination(s) collapsed: keys that do not apply to their method "
                     "made them repeat another cell")
    for planned in runs:
        state = "done" if is_finished(planned.path) else "todo"
        lines.append(f"  [{state}] {planned.path.name:<40} {planned.cell.label}")
    return "\n".join(lines)


def run_study(study: Study, progress: bool = True,
              runner: Callable[[Study, list[PlannedRun]], dict[str, str]] | None = None) -> dict[str, str]:
    """Run every unfinished cell; returns {run name: error} for runs that failed (the others go on).
    `runner(study, todo)` runs the cells elsewhere (the Ray backend: studies/ray_backend.py); by
    default they run here, one after another."""
    check_finished_runs(study)
    study.directory.mkdir(parents=True, exist_ok=True)
    write_study_file(study)
    todo = [r for r in study.runs if not is_finished(r.path)]
    failures = runner(study, todo) if runner else _run_here(todo, progress)
    write_study_file(study, failures)
    return failures


def _run_here(todo: list[PlannedRun], progress: bool) -> dict[str, str]:
    from peftlab.errors import NonFiniteLossError
    from peftlab.training.run import train

    failures: dict[str, str] = {}
    durations: list[float] = []
    started = time.perf_counter()
    for index, planned in enumerate(todo, 1):
        print(f"\n=== run {index}/{len(todo)}: {planned.path.name} ({planned.cell.label}, seed {planned.seed}); "
              f"elapsed {clock(time.perf_counter() - started)}{_eta(durations, len(todo) - index + 1)}", flush=True)
        config = planned.config.model_copy(update={"output": planned.config.output.model_copy(
            update={"progress": progress and planned.config.output.progress})})
        run_started = time.perf_counter()
        try:
            train(config, resume="auto")  # an interrupted run goes on from its last complete checkpoint
        except NonFiniteLossError as exc:
            failures[planned.path.name] = str(exc)
            print(f"run {planned.path.name} failed: {exc}", flush=True)
        durations.append(time.perf_counter() - run_started)
    return failures


def write_study_file(study: Study, failures: dict[str, str] | None = None) -> None:
    """The study's own record, read by the report: cells, their runs, the baseline."""
    atomic_write_json(study.directory / STUDY_FILE, {
        "name": study.spec.name, "description": study.spec.description, "origin": str(study.origin),
        "metric": study.spec.metric, "select": study.spec.select, "baseline": study.baseline_label(),
        "seeds": study.spec.seed_list(), "grid": study.spec.grid, "variants": list(study.spec.variants or {}),
        "cells": [{"label": c.label, "changes": c.changes,
                   "runs": [f"{c.slug}-seed{seed}" for seed in study.spec.seed_list()]} for c in study.cells],
        "failures": failures or {},
    })


def _eta(durations: list[float], remaining: int) -> str:
    if not durations:
        return ""
    return f", about {clock(sum(durations) / len(durations) * remaining)} left"


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
