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
command again goes on until `trials` trials are complete or pruned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from peftlab.config import METRICS, ConfigError, _Strict, apply_overrides, validate_config
from peftlab.metrics import LOWER_IS_BETTER
from peftlab.runs import atomic_write_json, is_finished, load_run
from peftlab.study import StudyError, read_spec

TUNE_FILE = "tune.json"


class FloatRange(_Strict):
    low: float
    high: float
    log: bool = False


class TuneSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = None
    base: Path | None = None
    config: dict[str, Any] = {}
    space: dict[str, FloatRange | list[Any]]
    trials: int = Field(20, ge=1)
    metric: Literal[METRICS] = "f1_macro"  # type: ignore[valid-type]
    pruner: Literal["median", "none"] = "median"
    seed: int = 0
    """Seed of the sampler (each trial trains with the base config's train.seed)."""
    storage: str | None = None
    """Optuna storage URL; default sqlite:///<tune directory>/optuna.db."""
    enqueue: list[dict[str, Any]] = []


class Tune:
    def __init__(self, spec: TuneSpec, base: dict[str, Any], origin: Path):
        self.spec, self.base, self.origin = spec, base, origin
        self.directory = Path(validate_config(base, origin=str(origin)).output.dir) / spec.name

    @property
    def storage(self) -> str:
        return self.spec.storage or f"sqlite:///{(self.directory / 'optuna.db').resolve()}"

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
    from peftlab.train import train

    spec = tune.spec
    tune.directory.mkdir(parents=True, exist_ok=True)
    direction = "minimize" if spec.metric in LOWER_IS_BETTER else "maximize"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1) if spec.pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=spec.name, storage=tune.storage, direction=direction, pruner=pruner,
                                sampler=optuna.samplers.TPESampler(seed=spec.seed), load_if_exists=True)
    if not study.trials:
        for params in spec.enqueue:
            study.enqueue_trial(params)

    def objective(trial) -> float:
        params = {key: _suggest(trial, key, choices) for key, choices in spec.space.items()}
        config = tune.config_for(params, trial.number)

        def report(record: dict) -> bool:
            trial.report(record[spec.metric], record["epoch"])
            return trial.should_prune()

        run = train(config, after_eval=report)
        summary = load_run(run).summary
        trial.set_user_attr("run", run.name)
        if summary["pruned"]:
            raise optuna.TrialPruned(f"pruned after epoch {summary['epochs_run']}")
        return summary["best"][spec.metric]

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = spec.trials - len(study.get_trials(states=done))
    if remaining > 0:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=done)])
    return write_tune_file(tune, study)


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
               "finished": bool(t.user_attrs.get("run")) and is_finished(tune.directory / t.user_attrs["run"])}
              for t in study.trials]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    record = {"name": tune.spec.name, "metric": tune.spec.metric, "direction": study.direction.name.lower(),
              "storage": tune.storage, "trials": trials,
              "best": next((t for t in trials if complete and t["number"] == study.best_trial.number), None)}
    atomic_write_json(tune.directory / TUNE_FILE, record)
    return record
