"""A study: one base config, a grid of changes, several seeds; every cell an ordinary run directory."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from peftlab.config import RunConfig
from peftlab.config_loading import (
    apply_overrides,
    drop_inapplicable_method_keys,
    parse_overrides,
    parse_yaml,
    read_yaml,
    validate_config,
)
from peftlab.errors import ConfigError, StudyError
from peftlab.studies.spec import UNSCALED_METRICS, StudySpec
from peftlab.tasks import METRICS
from peftlab.typed_config import Strict

STUDY_FILE = "study.json"


@dataclass
class Cell:
    """One configuration of the grid; run once per seed."""

    label: str
    slug: str
    changes: dict[str, Any]
    config: RunConfig  # with the first seed; `config_for(seed)` gives the others
    variants: tuple[str, ...] = ()  # its variant of each group

    def coordinates(self) -> dict[str, Any]:
        """Where it sits in the study: its variant of each group and its grid values (keys that apply)."""
        grid = {k: json.dumps(v, sort_keys=True) for k, v in self.changes.items() if k != "variant"}
        return {f"variant {i}": name for i, name in enumerate(self.variants)} | grid


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
        """The baseline cell, or the first of them where each cell has its own (`baselines`)."""
        return self._baseline_cells()[0].label

    def _baseline_cells(self) -> list[Cell]:
        wanted = self.spec.baseline
        if wanted is None:
            return self.cells[:1]
        exact = [cell for cell in self.cells if cell.label == wanted]
        matched = exact or [cell for cell in self.cells
                            if (isinstance(wanted, dict) and _matches(cell.config, wanted)) or wanted in cell.variants]
        if not matched:
            raise StudyError(f"{self.origin}: baseline {wanted!r} matches no cell "
                             f"(cells: {' | '.join(c.label for c in self.cells)})")
        return matched

    def baselines(self) -> dict[str, str]:
        """Each cell's baseline: the one baseline cell, or, where the baseline matches several, the one
        of them that shares most of the cell's variants and grid values; a tie is an error."""
        matched = self._baseline_cells()
        if len(matched) == 1:
            return {cell.label: matched[0].label for cell in self.cells}
        chosen = {}
        for cell in self.cells:
            if cell in matched:
                chosen[cell.label] = cell.label
                continue
            own = cell.coordinates()
            shared = [sum(own.get(k) == v for k, v in other.coordinates().items()) for other in matched]
            nearest = [other for other, count in zip(matched, shared) if count == max(shared)]
            if len(nearest) > 1:
                raise StudyError(f"{self.origin}: baseline {self.spec.baseline!r} matches {len(matched)} cells, and "
                                 f"cell {cell.label!r} is as close to {nearest[0].label!r} as to "
                                 f"{nearest[1].label!r}; name one cell")
            chosen[cell.label] = nearest[0].label
        return chosen

    def references(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Published figures per cell label: `{metric: {value (on the metric's own scale), source, statistic}}`.
        A key that names no cell or variant, a metric that is not one of the cell's task, or two figures
        for one cell and metric are errors."""
        resolved: dict[str, dict[str, dict[str, Any]]] = {}
        problems = []
        for block in self.spec.reference:
            for key, figures in block.figures.items():
                cells = [c for c in self.cells if c.label == key] or [c for c in self.cells if key in c.variants]
                if not cells:
                    problems.append(f"reference figures for {key!r}: no cell or variant has that name "
                                    f"(cells: {' | '.join(c.label for c in self.cells)})")
                for cell, (metric, value) in itertools.product(cells, figures.items()):
                    task = cell.config.data.task
                    if metric not in METRICS[task]:
                        problems.append(f"reference figures for {key!r}: {metric} is not a metric of cell "
                                        f"{cell.label!r} (data.task={task})")
                    elif metric in resolved.get(cell.label, {}):
                        problems.append(f"reference figures for {key!r}: cell {cell.label!r} already has a "
                                        f"published {metric}")
                    else:
                        scale = 100.0 if block.percent and metric not in UNSCALED_METRICS else 1.0
                        resolved.setdefault(cell.label, {})[metric] = {"value": value / scale, "source": block.source,
                                                                       "statistic": block.statistic}
        if problems:
            raise StudyError(f"{self.origin}: " + "\n  ".join(problems))
        return resolved


# --------------------------------------------------------------------------- loading and expanding


def read_spec(kind: type[Strict], path: Path, overrides: list[str] | dict[str, Any] | None,
              raw: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """A study-like file (`base` + `config` + its own keys) validated as `kind`, and its base config;
    `raw` instead of the file where the study is given as a dict (`path` then names it in errors, and
    a `base` is read relative to its folder). An override (`["seeds=2"]` or `{"seeds": 2}`) changes
    the study's own key if it has one, else the base config."""
    raw = read_yaml(path) if raw is None else raw
    own, config_overrides = {}, {}
    parsed = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    for key, value in parsed.items():
        (own if key in kind.model_fields else config_overrides)[key] = value
    try:
        spec = kind.model_validate({**raw, **own})
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise StudyError(f"{path}: {len(problems)} problem(s)\n  " + "\n  ".join(problems)) from None
    base = merge_configs(read_yaml(path.parent / spec.base) if spec.base else {}, spec.config)
    return spec, apply_overrides(base, config_overrides)


def load_study(path: Path | str | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None) -> Study:
    """Read, validate and expand a study file (or a study given as a dict); `overrides` change the
    study (`seeds=2`) or the base config."""
    raw = path if isinstance(path, dict) else None
    path = Path("study") if raw is not None else Path(path)
    spec, base = read_spec(StudySpec, path, overrides, raw)
    study = expand(spec, base, path)
    study.baselines()  # an unmatched or ambiguous baseline fails now, not after the runs
    study.references()  # and so do reference figures that name no cell
    return study


def expand(spec: StudySpec, base: dict[str, Any], origin: Path) -> Study:
    """Every variant × grid combination, with keys that do not apply to a cell's method dropped, and
    combinations that then coincide collapsed into one cell. All configs are validated here, before
    any run starts."""
    for key, values in spec.grid.items():
        if not values:
            raise StudyError(f"{origin}: grid.{key} has no values")
    groups = [list(group.items()) for group in spec.variant_groups()]
    keys = list(spec.grid)
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    collapsed = 0
    problems = []
    for chosen, values in itertools.product(itertools.product(*groups), itertools.product(*spec.grid.values())):
        names = tuple(name for name, _ in chosen)
        variant = ", ".join(names) or None
        changes: dict[str, Any] = {}
        for _, variant_changes in chosen:  # later groups override earlier ones
            changes |= variant_changes
        changes |= dict(zip(keys, values))
        raw = apply_overrides(base, changes)
        dropped = drop_inapplicable_method_keys(raw)
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
        cells.append(Cell(label, _slug(label), {**({"variant": variant} if variant else {}), **grid_changes}, config,
                          names))
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


