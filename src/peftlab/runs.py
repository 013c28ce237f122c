"""Run directories: written under `<name>.incomplete/`, renamed into place only when finished."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from peftlab.config import UNFINISHED_SUFFIX, OutputConfig, RunConfig, run_name_problem
from peftlab.config_loading import migrate_saved, validate_config
from peftlab.durable import fsync_dir
from peftlab.errors import RunError

CONFIG, METRICS, SUMMARY, LABELS, MODEL = "config.yaml", "metrics.jsonl", "summary.json", "labels.json", "model"
CHECKPOINTS = "checkpoints"
INCOMPLETE = UNFINISHED_SUFFIX


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename: readers see the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself survives a power cut only once the directory is synced


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def replace_directory(build: Callable[[Path], None], target: Path) -> None:
    """Build a directory beside `target`, then swap it in; a crash leaves the old one whole."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if os.path.lexists(target):
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def is_empty_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def is_run(path: Path) -> bool:
    """A finished peftlab run (its summary and config), a real directory: what output.overwrite may replace."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and is_finished(path) and (path / CONFIG).is_file()


def _is_work(path: Path) -> bool:
    """An unfinished peftlab run (or the empty directory a start left): what a fresh start may remove."""
    return is_empty_dir(path) or (path.is_dir() and not path.is_symlink() and (path / CONFIG).is_file())


def checkpoint_names(work: Path) -> list[str]:
    root = Path(work) / CHECKPOINTS
    return sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


class RunLock:
    """An exclusive `flock` on `<output.dir>/.<name>.lock` while a process works on the run; the file
    names the holder (pid, host, start time). The kernel releases the lock when the process dies, so a
    killed run never leaves a stale lock; a later start reads nothing of a dead holder."""

    def __init__(self, path: Path, run: Path):
        self.path, self.run = Path(path), Path(run)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise RunError(f"run {self.run} is in use by {holder} (lock {self.path}); wait for it to finish "
                               "or stop it, or choose another output.name") from None
            try:  # the last holder removes the file as it lets go: lock the file that is there now
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunError(f"could not lock {self.path}: it keeps being replaced")

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return (f"process {record['pid']} on host {record['host']} since {record['started']} "
                    f"({record.get('command') or 'no command recorded'})")
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (it has not yet written its pid)"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)  # while still held: a process that opened it meanwhile retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


@dataclass
class RunDir:
    final: Path
    work: Path
    overwrite: bool = False
    resuming: bool = False  # resume=auto or resume=PATH was asked for
    lock: RunLock | None = None

    @classmethod
    def reserve(cls, output: OutputConfig, default_name: str, resume: str | Path | None = None) -> "RunDir":
        """Name the run, lock it and check it is free, before any work is spent. Nothing is written
        where output.dir does not exist yet (it is locked once create() makes it)."""
        name = output.name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if problem := run_name_problem(name):
            raise RunError(f"output.name: {problem}")
        final = Path(output.dir) / name
        run = cls(final=final, work=final.with_name(name + INCOMPLETE), overwrite=output.overwrite,
                  resuming=resume is not None)
        if final.parent.is_dir():
            run._lock()
        try:
            run.check()
        except BaseException:
            run.release()
            raise
        return run

    def _lock(self) -> None:
        if self.lock is None:
            self.lock = RunLock(self.final.parent / f".{self.final.name}.lock", self.final).acquire()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def check(self, work_too: bool = True) -> None:
        """What sits at the run's two places may be replaced or removed only if it is peftlab's own."""
        final, work = self.final, self.work
        if os.path.lexists(final) and not is_empty_dir(final):
            if not is_run(final):
                raise RunError(f"{final} is in the way and is not a peftlab run; move it or choose another "
                               "output.name (peftlab never deletes it)")
            if not self.overwrite:
                raise RunError(f"run {final} already exists; choose output.name or set output.overwrite=true")
        if work_too and os.path.lexists(work):
            if not _is_work(work):
                raise RunError(f"{work} is in the way and is not an unfinished peftlab run; move it or choose "
                               "another output.name (peftlab never deletes it)")
            saved = checkpoint_names(work)
            if saved and not (self.resuming or self.overwrite):
                raise RunError(f"{work} holds checkpoints of an unfinished run (latest {saved[-1]}): continue it "
                               "with resume=auto, or set output.overwrite=true to discard them")

    def create(self, resuming: bool = False) -> "RunDir":
        """A fresh work directory, or, when resuming, the one the checkpoint lives in."""
        work = self.work
        if self.lock is None:  # output.dir did not exist at reserve(): nothing was there to protect
            work.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            self.check()
        if resuming:
            return self
        if os.path.lexists(work):
            print(f"peftlab: removing the unfinished run left at {work}")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        fsync_dir(work.parent)
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
        """summary.json last, then the rename that makes the run visible as finished; the checkpoints
        go only after it (model/ holds the best): a failed rename leaves the run resumable."""
        self.write_json(SUMMARY, summary)
        self.check(work_too=False)  # nothing foreign appeared at the target while the run trained
        replace_directory(lambda tmp: os.replace(self.work, tmp), self.final)
        shutil.rmtree(self.final / CHECKPOINTS, ignore_errors=True)
        self.release()
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
    config = validate_config(migrate_saved(yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))),
                             origin=str(path / CONFIG))
    labels = json.loads((path / LABELS).read_text(encoding="utf-8"))["labels"]
    summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    return FinishedRun(path, config, labels, summary)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(Path(path) / METRICS, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
