"""Run directories: written under `<name>.incomplete/`, renamed into place only when finished."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from peftlab.config import OutputConfig, RunConfig, validate_config

CONFIG, METRICS, SUMMARY, LABELS, MODEL = "config.yaml", "metrics.jsonl", "summary.json", "labels.json", "model"
CHECKPOINTS = "checkpoints"
INCOMPLETE = ".incomplete"


class RunError(RuntimeError):
    """A run directory that is missing, unfinished or in the way."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename: readers see the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def replace_directory(build: Callable[[Path], None], target: Path) -> None:
    """Build a directory beside `target`, then swap it in; a crash leaves the old one whole."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class RunDir:
    final: Path
    work: Path

    @classmethod
    def reserve(cls, output: OutputConfig, default_name: str) -> "RunDir":
        """Name the run and check it is free, before any work is spent; nothing is written yet."""
        name = output.name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        final = Path(output.dir) / name
        if is_finished(final) and not output.overwrite:
            raise RunError(f"run {final} already exists; choose output.name or set output.overwrite=true")
        return cls(final=final, work=final.with_name(name + INCOMPLETE))

    def create(self, resuming: bool = False) -> "RunDir":
        """A fresh work directory, or, when resuming, the one the checkpoint lives in."""
        work = self.work
        if resuming:
            return self
        if work.exists():
            print(f"peftlab: removing the unfinished run left at {work}")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        return self

    def truncate_log(self, lines: int) -> None:
        """Back to the metric lines a checkpoint had seen: a resumed run logs the rest once."""
        path = self.work / METRICS
        kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines] if path.exists() else []
        atomic_write_text(path, "".join(kept))

    def log_lines(self) -> int:
        path = self.work / METRICS
        return sum(1 for _ in open(path, encoding="utf-8")) if path.exists() else 0

    def save_config(self, config: RunConfig) -> None:
        atomic_write_text(self.work / CONFIG, config.to_yaml())

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_json(self.work / name, data)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.work / METRICS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")

    def save_model(self, save: Callable[[Path], None]) -> None:
        replace_directory(save, self.work / MODEL)

    def finish(self, summary: dict[str, Any]) -> Path:
        """summary.json last, then the rename that makes the run visible as finished."""
        shutil.rmtree(self.work / CHECKPOINTS, ignore_errors=True)  # model/ holds the best; resume is moot now
        self.write_json(SUMMARY, summary)
        replace_directory(lambda tmp: os.replace(self.work, tmp), self.final)
        return self.final


def is_finished(path: Path) -> bool:
    return (Path(path) / SUMMARY).is_file() and not str(path).endswith(INCOMPLETE)


@dataclass
class FinishedRun:
    path: Path
    config: RunConfig
    labels: list[str]
    summary: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL


def load_run(path: Path | str) -> FinishedRun:
    import yaml

    path = Path(path)
    if not path.is_dir():
        raise RunError(f"run directory {path} does not exist")
    if not is_finished(path):
        raise RunError(f"{path} is not a finished run (no {SUMMARY}); it may have crashed or still be running")
    config = validate_config(yaml.safe_load((path / CONFIG).read_text(encoding="utf-8")), origin=str(path / CONFIG))
    labels = json.loads((path / LABELS).read_text(encoding="utf-8"))["labels"]
    summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    return FinishedRun(path, config, labels, summary)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(Path(path) / METRICS, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
