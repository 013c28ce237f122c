"""`peftlab.study` and `peftlab.report`, and the study result they give."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from peftlab.api.overrides import flat_overrides
from peftlab.api.running import Run
from peftlab.runs import is_finished

if TYPE_CHECKING:
    import pandas as pd

    from peftlab.studies.study import Study


@dataclass
class StudyResult:
    """The runs of a study directory (or of any directories of runs), compared."""

    paths: list[Path]
    failures: dict[str, str] = field(default_factory=dict)
    """Runs that failed: name -> error. Running the study again retries them."""
    page: Path | None = None
    """report.html, where `study(..., write_report=True)` wrote it."""

    @property
    def directory(self) -> Path:
        return self.paths[0]

    @property
    def runs(self) -> list[Run]:
        found = [p for path in self.paths for p in ([path] if is_finished(path) else sorted(path.iterdir()))]
        return [Run.open(p) for p in found if p.is_dir() and is_finished(p)]

    def table(self) -> "pd.DataFrame":
        """The report's quality table as numbers: a row per configuration, its number of runs, and for
        each metric the mean over seeds, the sample std and the Student-t 95% interval."""
        import pandas as pd

        from peftlab.studies.report import quality_metrics
        from peftlab.studies.results import collect

        results = collect(self.paths)
        rows = {}
        for configuration in results.configurations:
            row: dict[str, Any] = {"runs": len(configuration.runs)}
            for metric in quality_metrics(results):
                if configuration.has(metric, results.select):
                    stat = configuration.stat(metric, results.select)
                    row |= {metric: stat.mean, f"{metric}_std": stat.std, f"{metric}_ci_low": stat.low,
                            f"{metric}_ci_high": stat.high}
            rows[configuration.label] = row
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("configuration")

    def report(self, out: str | Path | None = None) -> Path:
        """Write the report (report.html and report.md, with its figures) and return report.html's path;
        in a notebook the report is shown too."""
        from peftlab.studies.report import write_report

        page = write_report(self.paths, Path(out) if out else None) / "report.html"
        _show_in_notebook(page)
        return page


def _show_in_notebook(page: Path) -> None:
    """The report inline where a Jupyter kernel runs this (its figures are embedded in the file)."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and "IPKernelApp" in shell.config:
        display(HTML(page.read_text(encoding="utf-8")))


def plan(spec: str | Path | dict[str, Any], **overrides: Any) -> "Study":
    """The study's runs, validated and expanded, not started (`peftlab study --dry-run`)."""
    from peftlab.studies.running import check_finished_runs
    from peftlab.studies.study import load_study

    study = load_study(spec if isinstance(spec, dict) else Path(spec), flat_overrides(overrides))
    check_finished_runs(study)  # a finished run in its directory must really be this study's
    return study


def study(spec: "str | Path | dict[str, Any] | Study", *, progress: bool = True, backend: str = "local",
          address: str | None = None, retries: int = 1, write_report: bool = False,
          **overrides: Any) -> StudyResult:
    """Run a study (`peftlab study`): a YAML file's path or a dict, changed by `overrides` (`seeds=2`,
    `data={"n_train": 500}`). Finished runs are kept, so calling it again resumes. `backend="ray"` runs
    every run as a Ray task (on the cluster at `address`, or a local Ray). With `write_report`, the
    report is written at the end (`StudyResult.page`). Where the base config reports to MLflow, the
    study is a parent run with its runs as children, and the report one of its artifacts."""
    from peftlab.studies.running import run_study
    from peftlab.studies.study import Study
    from peftlab.training.tracking import parent_run

    chosen = spec if isinstance(spec, Study) else plan(spec, **overrides)  # a Study: planned already
    runner: Callable | None = None
    if backend == "ray":
        from functools import partial

        from peftlab.studies.ray_backend import run_on_ray

        runner = partial(run_on_ray, address=address, retries=retries)
    elif backend != "local":
        from peftlab.errors import StudyError

        raise StudyError(f"backend {backend!r}: local or ray")
    with parent_run(chosen.runs[0].config, chosen.spec.name, "study") as parent:
        result = StudyResult([chosen.directory], run_study(chosen, progress=progress, runner=runner))
        if write_report and any(chosen.directory.iterdir()):
            result.page = result.report()
            if parent:
                parent.log_artifacts(result.page.parent, "report")
    return result


def report(*paths: str | Path, out: str | Path | None = None) -> Path:
    """The report of study directories, run directories or folders of runs (`peftlab report`):
    returns report.html's path (shown in a notebook)."""
    return StudyResult([Path(p) for p in paths]).report(out)
