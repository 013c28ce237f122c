"""Experiment trackers (output.report_to): MLflow and TensorBoard receive what the run directory gets.

Each is imported only when asked for. A tracker is a copy of the run directory, never its only home:
one that fails (a server down, a bad URI, a full disk) is a warning, is dropped, and the run goes on
with nothing lost. A study or a search is an MLflow parent run whose runs are its children
(`parent_run`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from peftlab.config import RunConfig

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
EXPERIMENT = "peftlab"  # unless $MLFLOW_EXPERIMENT_NAME
_PARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftlab_mlflow_parent", default=None)


def _numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record (nested figures such as the confusion matrix stay in the run's files)."""
    return {f"{prefix}{key}": float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and key not in ("step", "epoch")}


def _metric_names(record: dict[str, Any]) -> dict[str, float]:
    """`loss`, `lr`, ... of a training record; `eval_accuracy`, `eval_loss`, ... of an evaluation (as
    transformers' Trainer names them)."""
    if record.get("type") == "eval":
        return {(k if k.startswith("eval_") else f"eval_{k}"): v for k, v in _numbers(record).items()}
    return _numbers(record)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]  # MLflow's longest parameter value
    return out


def tracking_uri(output_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(output_dir) / MLFLOW_DB).resolve()}"


class MlflowRun:
    """One MLflow run through MlflowClient: no global active run, so studies and threads do not mix."""

    def __init__(self, output_dir: Path, name: str, tags: dict[str, str], parent: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri(output_dir))
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # artifacts beside the store, not in whatever folder the process started in
            artifacts = (Path(output_dir) / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifacts)
        tags = tags | ({"mlflow.parentRunId": parent} if parent else {})
        self.id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.id, params=items[start : start + 100])

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_artifacts(self, directory: Path, under: str | None = None) -> None:
        self.client.log_artifacts(self.id, str(directory), under)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.id, status=status)


class Trackers:
    """The trackers of one training run; every call is guarded (`_guarded`)."""

    def __init__(self, config: RunConfig, work: Path, name: str):
        self.config, self.work, self.name = config, work, name
        self.wanted = list(config.output.report_to)
        self.mlflow: MlflowRun | None = None
        self.tensorboard = None
        self.done = False
        for name in self.wanted:
            self._guarded(name, getattr(self, f"_open_{name}"))

    def _open_mlflow(self) -> None:
        config = self.config
        tags = {"method": config.method.kind, "model": config.model.name, "seed": str(config.train.seed),
                "task": config.data.task, "run_dir": self.name}
        self.mlflow = MlflowRun(config.output.dir, tags["run_dir"], tags, _PARENT.get())
        self.mlflow.log_params(_flat(config.model_dump(mode="json")))

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(log_dir=str(self.work / TENSORBOARD_DIR))

    def _guarded(self, name: str, call, *args) -> None:
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker never stops a run
            warnings.warn(f"output.report_to {name}: {type(exc).__name__}: {exc}; the run goes on without "
                          f"{name} (its directory has everything)", stacklevel=2)
            setattr(self, name, None)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        values = _metric_names(record)
        if self.mlflow and values:
            self._guarded("mlflow", self.mlflow.log_metrics, values, step)
        if self.tensorboard and values:
            section = "eval" if record.get("type") == "eval" else "train"
            self._guarded("tensorboard", lambda: [self.tensorboard.add_scalar(f"{section}/{k.removeprefix('eval_')}",
                                                                              v, step) for k, v in values.items()])

    def before_finish(self, summary: dict[str, Any]) -> None:
        """The event files complete before the run directory is renamed; the summary's numbers logged."""
        if self.tensorboard:
            self._guarded("tensorboard", self.tensorboard.close)
        if self.mlflow:
            numbers = _numbers({k: v for k, v in summary.items() if k not in ("best", "final")}, "run_")
            best = _numbers(summary.get("best") or {}, "best_")
            self._guarded("mlflow", self.mlflow.log_metrics, numbers | best, int(summary.get("steps", 0)))

    def finished(self, final: Path) -> None:
        """The finished run's files (config, summary, metrics, the best model) as MLflow artifacts."""
        self.done = True
        if self.mlflow:
            self._guarded("mlflow", self.mlflow.log_artifacts, final)
            self._guarded("mlflow", self.mlflow.end, "FINISHED")

    def close(self, failed: bool = True) -> None:
        """A run that ended without finishing (an error, a signal): its MLflow run is marked so."""
        if self.tensorboard:
            self._guarded("tensorboard", self.tensorboard.close)
        if self.mlflow and not self.done:
            self._guarded("mlflow", self.mlflow.end, "FAILED" if failed else "KILLED")


@contextlib.contextmanager
def parent_run(config: RunConfig, name: str, kind: str) -> Iterator[MlflowRun | None]:
    """An MLflow parent run for a study or a search (`kind`) whose base config asks for mlflow: the runs
    trained inside are its children. None (and no MLflow) otherwise, or where MLflow fails."""
    parent = None
    if "mlflow" in config.output.report_to:
        try:
            parent = MlflowRun(config.output.dir, name, {"peftlab": kind}, _PARENT.get())
        except Exception as exc:  # noqa: BLE001 - a tracker never stops a study
            warnings.warn(f"output.report_to mlflow: {type(exc).__name__}: {exc}; the {kind} goes on without "
                          "mlflow", stacklevel=2)
    token = _PARENT.set(parent.id if parent else None)
    status = "FAILED"
    try:
        yield parent
        status = "FINISHED"
    finally:
        _PARENT.reset(token)
        if parent:
            with contextlib.suppress(Exception):
                parent.end(status)
