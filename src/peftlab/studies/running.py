"""Running a study: its plan shown, finished runs checked, every other cell run here (or by an
injected runner such as the Ray backend), the study's own record written."""

from __future__ import annotations

import time
from collections.abc import Callable

import yaml

from peftlab.config_loading import (
    config_differences,
)
from peftlab.errors import StudyError
from peftlab.models import model_config
from peftlab.runs import CONFIG, atomic_write_json, is_finished
from peftlab.studies.study import STUDY_FILE, PlannedRun, Study
from peftlab.windows import check_classifier


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


def check_classifiers(study: Study) -> None:
    """A model that cannot read chunks stops the study before its first run, not at each of its runs."""
    checked = set()
    for planned in study.runs:
        config = planned.config
        if config.data.long_texts == "chunks" and config.model.name not in checked:
            check_classifier("chunks", config.model.name, model_config(config.model.name))
            checked.add(config.model.name)


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
    check_classifiers(study)
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
    """The study's own record, read by the report: cells, their runs, baselines and published figures."""
    baselines, references = study.baselines(), study.references()
    several = len(set(baselines.values())) > 1  # else "baseline" alone says it, as before
    atomic_write_json(study.directory / STUDY_FILE, {
        "name": study.spec.name, "description": study.spec.description, "origin": str(study.origin),
        "metric": study.spec.metric, "select": study.spec.select, "baseline": study.baseline_label(),
        "seeds": study.spec.seed_list(), "grid": study.spec.grid,
        "variants": [name for group in study.spec.variant_groups() for name in group],
        "cells": [{"label": c.label, "changes": c.changes,
                   **({"baseline": baselines[c.label]} if several else {}),
                   **({"reference": references[c.label]} if c.label in references else {}),
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
