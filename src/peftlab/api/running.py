"""`peftlab.train` and the finished run it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.api.overrides import flat_overrides
from peftlab.config import RunConfig
from peftlab.config_loading import apply_overrides, drop_inapplicable_method_keys, read_yaml, validate_config
from peftlab.errors import ConfigError
from peftlab.runs import FinishedRun, is_finished, load_run, read_metrics

if TYPE_CHECKING:
    import pandas as pd

    from peftlab.serving.inference import Classifier


def resolve_config(config: RunConfig | dict[str, Any] | str | Path, overrides: dict[str, Any],
                   merge_sections: bool = False) -> RunConfig:
    """A run's config from a YAML file, a dict or a RunConfig, changed by dotted `overrides`, validated
    as the command line's. With `merge_sections` (the Python API's keyword arguments) a section given
    as a dict changes only the keys it names, and a method switched to another kind drops the keys the
    new kind has none of (`method={"kind": "full"}` on a LoRA config), as a study's variants do; without
    it (the command line), `method={kind: full}` replaces the section."""
    if isinstance(config, RunConfig):
        raw, origin = config.model_dump(mode="json"), "config"
    elif isinstance(config, dict):
        raw, origin = config, "config"
    elif isinstance(config, (str, Path)):
        raw, origin = read_yaml(Path(config)), str(config)
    else:
        raise ConfigError(f"a config is a YAML file's path, a dict or a peftlab RunConfig, not {type(config).__name__}")
    changes = flat_overrides(overrides) if merge_sections else overrides
    raw = apply_overrides(raw, changes)
    if merge_sections and "method.kind" in changes:
        drop_inapplicable_method_keys(raw)
    return validate_config(raw, origin=origin)


@dataclass(repr=False)
class Run(FinishedRun):
    """A finished run: its directory, config, labels and summary (summary.json), and the records of
    its metrics.jsonl as a table."""

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        run = load_run(path)
        return cls(run.path, run.config, run.labels, run.summary)

    @property
    def metrics(self) -> "pd.DataFrame":
        """One row per logged record (`type` train or eval: step, epoch, loss, every metric), numbers
        only; per-class figures, confusion matrices and reliability bins are in `summary`."""
        import pandas as pd

        records = [{k: v for k, v in record.items() if not isinstance(v, (dict, list))}
                   for record in read_metrics(self.path)]
        return pd.DataFrame.from_records(records)

    @property
    def best(self) -> dict[str, Any]:
        """The kept checkpoint's evaluation."""
        return self.summary["best"]

    def classifier(self, device: str | None = None, raw: bool = False) -> "Classifier":
        """The trained classifier, ready to predict (`peftlab.load`)."""
        from peftlab.api.loading import load

        return load(self.path, device=device, raw=raw)

    def __repr__(self) -> str:
        metric = self.summary.get("best_metric")
        score = f", {metric} {self.best[metric]:.4f}" if metric and metric in self.best else ""
        return f"Run({str(self.path)!r}, {self.config.method.kind}{score})"


def train(config: RunConfig | dict[str, Any] | str | Path, *, resume: str | Path | None = None,
          **overrides: Any) -> Run | None:
    """Train one run (`peftlab train`): `config` is a YAML file's path, a dict or a RunConfig, changed
    by `overrides`. `resume="auto"` goes on from the run's last complete checkpoint. Bad input raises
    the error the command line prints in one line (peftlab.errors), before any work. Under torchrun or
    accelerate launch, the processes other than the main one (which writes the run) get None."""
    from peftlab.training.run import train as train_run

    path = train_run(resolve_config(config, overrides, merge_sections=True), resume=resume)
    return Run.open(path) if is_finished(path) else None
