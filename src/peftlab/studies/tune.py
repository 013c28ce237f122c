"""`peftlab tune`: hyper-parameter search with Optuna, every trial an ordinary run directory.

A tune file is a study file's base config plus a search space:

    name: lora-lr
    base: ../configs/tweets-lora.yaml
    space:
      train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float (int when low and high are ints)
      method.r: [4, 8, 16]                                 # categorical
    trials: 20
    metric: f1_macro            # reported after every evaluation; the pruner stops weak trials early
    enqueue: [{train.lr: 2.0e-3, method.r: 8}]             # tried first (known good settings)

Trials are stored in Optuna's storage: SQLite in the tune directory by default, or a database URL
shared by many `peftlab tune` processes on many machines, which then share the work. Running the
command again goes on until `trials` trials are complete or pruned. `storage: env:VARNAME` takes the
URL from that environment variable (so that its password is in no file); the URL's password is
printed and saved as `***`.

A trial that fails on its own account (non-finite loss, a setting the model or config refuses, out of
GPU memory) is recorded as FAIL (the reason in its user attrs `error` and in tune.json) and the
search goes on; after `max_failures` such failures in one call it stops. Any other error (data,
model loading, a bug) and Ctrl-C stop the search, the trial recorded as FAIL with its reason too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from peftlab.config_loading import apply_overrides, validate_config
from peftlab.errors import ConfigError, StudyError
from peftlab.metrics import LOWER_IS_BETTER
from peftlab.runs import atomic_write_json, is_finished, load_run
from peftlab.studies.study import read_spec
from peftlab.tasks import ALL_METRICS
from peftlab.typed_config import Strict

TUNE_FILE = "tune.json"


class FloatRange(Strict):
    low: float
    high: float
    log: bool = False


class TuneSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = None
    base: Path | None = None
    config: dict[str, Any] = {}
    space: dict[str, FloatRange | list[Any]]
    trials: int = Field(20, ge=1)
    metric: Literal[ALL_METRICS] = "f1_macro"  # type: ignore[valid-type]
    pruner: Literal["median", "none"] = "median"
    seed: int = 0
    """Seed of the sampler (each trial trains with the base config's train.seed)."""
    storage: str | None = None
    """Optuna storage URL, or `env:VARNAME` to read it from that environment variable;
    default sqlite:///<tune directory>/optuna.db."""
    enqueue: list[dict[str, Any]] = []
    max_failures: int | None = Field(None, ge=1)
    """Failed trials after which one call stops (default: `trials`); failed trials do not count as done."""


ENV_PREFIX = "env:"


def redact_url(url: str) -> str:
    """The URL with its password (userinfo and `password=` query values) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    user = re.match(r"[^:/@?#]*:", rest)
    if sep and user and "@" in rest:  # up to the last @: a password may hold an unquoted @, / or ?
        url = f"{scheme}://{user.group()}***{rest[rest.rfind('@'):]}"
    return re.sub(r"(?i)((?:password|passwd|pwd)=)[^&;#]*", r"\1***", url)


def resolve_storage(storage: str) -> str:
    """`env:VARNAME` -> that variable's value; any other value as it is."""
    if not storage.startswith(ENV_PREFIX):
        return storage
    name = storage[len(ENV_PREFIX):]
    value = os.environ.get(name)
    if not name or not value:
        raise StudyError(f"storage {storage!r}: the environment variable {name or '(none named)'} is not set")
    return value


class Tune:
    def __init__(self, spec: TuneSpec, base: dict[str, Any], origin: Path):
        self.spec, self.base, self.origin = spec, base, origin
        self.directory = Path(validate_config(base, origin=str(origin)).output.dir) / spec.name

    @property
    def storage_url(self) -> str:
        """The URL Optuna connects to, password included: never print or save it."""
        if self.spec.storage:
            return resolve_storage(self.spec.storage)
        return f"sqlite:///{(self.directory / 'optuna.db').resolve()}"

    @property
    def storage(self) -> str:
        """The storage as printed and saved: the URL with its password replaced by ***."""
        return redact_url(self.storage_url)

    def config_for(self, params: dict[str, Any], number: int):
        raw = apply_overrides(self.base, params)
        raw["output"] = {**raw.get("output", {}), "dir": str(self.directory), "name": f"trial-{number:04d}",
                         "overwrite": False}
        return validate_config(raw, origin=f"{self.origin} (trial {number}: {params})")


def load_tune(path: Path | str, overrides: list[str] | None = None) -> Tune:
    """Read and validate a tune file; every choice of the space is checked against the config now."""
    path = Path(path)
    spec, base = read_spec(TuneSpec, path, overrides)
    tune = Tune(spec, base, path)
    tune.storage_url  # noqa: B018 -- an unset env: variable fails now, before any trial
    for key, choices in spec.space.items():
        values = choices if isinstance(choices, list) else [choices.low, choices.high]
        if not values:
            raise StudyError(f"{path}: space.{key} has no values")
        for value in values:
            try:
                tune.config_for({key: value}, 0)
            except ConfigError as exc:
                raise StudyError(f"{path}: space.{key} = {value!r}: {exc}") from None
    return tune


def run_tune(tune: Tune) -> dict[str, Any]:
    """Run trials until `trials` are complete or pruned (counting those of earlier or parallel runs)."""
    try:
        import optuna
    except ImportError:
        raise StudyError("peftlab tune needs Optuna: pip install 'peftlab[tune]'") from None
    from peftlab.training.run import train
    from peftlab.training.tracking import parent_run

    failures_here = trial_failures()
    spec = tune.spec
    tune.directory.mkdir(parents=True, exist_ok=True)
    direction = "minimize" if spec.metric in LOWER_IS_BETTER else "maximize"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1) if spec.pruner == "median" else optuna.pruners.NopPruner()
    url = tune.storage_url
    try:
        study = optuna.create_study(study_name=spec.name, storage=url, direction=direction, pruner=pruner,
                                    sampler=optuna.samplers.TPESampler(seed=spec.seed), load_if_exists=True)
    except Exception as exc:  # its message may quote the URL, password and all
        raise StudyError(f"cannot open the tune storage {tune.storage}: "
                         f"{_without_secret(f'{type(exc).__name__}: {exc}', url)}") from None
    if not study.trials:
        for params in spec.enqueue:
            study.enqueue_trial(params)

    def objective(trial) -> float:
        params = {key: _suggest(trial, key, choices) for key, choices in spec.space.items()}

        def report(record: dict) -> bool:
            trial.report(record[spec.metric], record["epoch"])
            return trial.should_prune()

        try:
            run = train(tune.config_for(params, trial.number), after_eval=report)
            summary = load_run(run).summary
        except BaseException as exc:  # recorded here; optuna marks the trial FAIL, `catch` decides what goes on
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            left = tune.directory / f"trial-{trial.number:04d}.incomplete"
            if left.is_dir():
                trial.set_user_attr("run", left.name)
            if isinstance(exc, KeyboardInterrupt):
                print(f"trial {trial.number} interrupted; the search stops", flush=True)
            elif not isinstance(exc, failures_here):
                print(f"trial {trial.number} failed: {type(exc).__name__}: {exc}; the search stops", flush=True)
            raise
        trial.set_user_attr("run", run.name)
        if summary["pruned"]:
            raise optuna.TrialPruned(f"pruned after epoch {summary['epochs_run']}")
        return summary["best"][spec.metric]

    failed = {"n": 0}
    limit = spec.max_failures or spec.trials

    def after_trial(study, trial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            failed["n"] += 1
            print(f"trial {trial.number} failed: {trial.user_attrs.get('error', '(no reason recorded)')}; "
                  + ("the search goes on" if failed["n"] < limit else
                     f"{failed['n']} trials failed, the search stops (max_failures)"), flush=True)
            if failed["n"] >= limit:
                study.stop()
        write_tune_file(tune, study)

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = spec.trials - len(study.get_trials(states=done))
    try:
        # Trials report to MLflow as children of one run for the search, where the config asks for it.
        with parent_run(tune.config_for({}, 0), spec.name, "tune"):
            if remaining > 0:
                study.optimize(objective, catch=failures_here,
                               callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=done), after_trial])
    finally:  # also when Ctrl-C or an error stops the search: tune.json says what happened
        record = write_tune_file(tune, study)
    return record


def trial_failures() -> tuple[type[Exception], ...]:
    """Errors that are one trial's own (its settings diverge, do not fit, or do not fit in memory):
    the trial fails and the search goes on. Others (data, model loading, bugs) stop the search."""
    import torch

    from peftlab.errors import NonFiniteLossError
    from peftlab.methods import MethodError

    memory = tuple(c for c in (getattr(torch, "OutOfMemoryError", None),) if c is not None)
    return (NonFiniteLossError, MethodError, ConfigError, *memory)


def _without_secret(text: str, url: str) -> str:
    redacted = redact_url(url)
    text = text.replace(url, redacted)
    for secret in {m for m in re.findall(r"://[^:/@]*:([^@]+)@", url)} | \
            set(re.findall(r"(?i)(?:password|passwd|pwd)=([^&;#]*)", url)):
        if secret:
            text = text.replace(secret, "***")
    return text


def _suggest(trial, key: str, choices: FloatRange | list[Any]) -> Any:
    if isinstance(choices, list):
        return trial.suggest_categorical(key, choices)
    if float(choices.low).is_integer() and float(choices.high).is_integer() and not choices.log:
        return trial.suggest_int(key, int(choices.low), int(choices.high))
    return trial.suggest_float(key, choices.low, choices.high, log=choices.log)


def write_tune_file(tune: Tune, study) -> dict[str, Any]:
    """tune.json: every trial (params, state, value, run directory) and the best one."""
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "run": t.user_attrs.get("run"),
               "finished": bool(t.user_attrs.get("run")) and is_finished(tune.directory / t.user_attrs["run"]),
               **({"error": t.user_attrs.get("error")} if t.state.name == "FAIL" else {})}
              for t in study.trials]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    record = {"name": tune.spec.name, "metric": tune.spec.metric, "direction": study.direction.name.lower(),
              "storage": tune.storage, "trials": trials,
              "failures": {str(t["number"]): t.get("error") for t in trials if t["state"] == "FAIL"},
              "best": next((t for t in trials if complete and t["number"] == study.best_trial.number), None)}
    atomic_write_json(tune.directory / TUNE_FILE, record)
    return record
