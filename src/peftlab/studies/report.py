"""A study's report: tables (mean ± std, 95% intervals, paired tests) and plots, as Markdown and HTML."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftlab.runs import LABELS, RunError, is_empty_dir, replace_directory
from peftlab.studies import plots
from peftlab.studies.results import ResultSet, collect
from peftlab.studies.spec import UNSCALED_METRICS
from peftlab.studies.stats import summarize

REPORT_DIR = "report"
SWEEP_KEYS = ("method.r", "data.n_train", "model.max_length")


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + (["", self.note] if self.note else []))

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"

    def text(self) -> str:
        widths = [max(len(r[i]) for r in [self.header, *self.rows]) for i in range(len(self.header))]
        lines = [self.header, ["-" * w for w in widths], *self.rows]
        return "\n".join([self.title] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines])


# --------------------------------------------------------------------------- tables


def _shared_metrics(results: ResultSet) -> set[str]:
    """The metrics every run of the results has (a task's own: a regression has no accuracy)."""
    scored = [set(run.evaluation(results.select)) for c in results.configurations for run in c.runs]
    return set.intersection(*scored) if scored else set()


def quality_metrics(results: ResultSet) -> list[str]:
    """Beside the study's metric, the task's usual ones that every run has (a regression has no accuracy),
    and the study's metric over the texts one window cannot hold (evaluation.long_text_scores)."""
    shared = _shared_metrics(results)
    return [results.metric] + [m for m in ("accuracy", "f1_macro", "f1_micro", "pearson", "mae", "eval_loss",
                                           f"{results.metric}_long", "ece", "ece_calibrated")
                               if m != results.metric and m in shared]


def quality_table(results: ResultSet) -> Table:
    metrics = quality_metrics(results)
    header = ["configuration", "runs"]
    for metric in metrics:
        header += [plots.metric_name(metric), "95% CI"]
    rows = []
    for configuration in results.configurations:
        row = [configuration.label, str(len(configuration.runs))]
        for metric in metrics:
            if not configuration.has(metric, results.select):  # a regression among classifications
                row += ["—", ""]
                continue
            stat = configuration.stat(metric, results.select)
            row += [stat.text(), stat.interval()]
        rows.append(row)
    which = "the kept checkpoint (best on eval)" if results.select == "best" else "the last evaluation"
    missing = " — : the task has no such metric." if any("—" in row for row in rows) else ""
    return Table("Quality", header, rows,
                 f"Mean ± sample std over seeds, Student-t 95% interval; metrics of {which}.{missing}")


# A task's usual companion of its own metric (GLUE reports MRPC and QQP as F1 / accuracy, STS-B as
# Pearson / Spearman): shown beside it in the table of published figures.
COMPANIONS = {"f1": ("accuracy",), "pearson": ("spearman",), "spearman": ("pearson",)}


def reference_table(results: ResultSet) -> Table | None:
    """Each configuration's own metric (and its companion, and every metric with a published figure):
    mean ± std and median over seeds beside the published figure, in points as papers print them."""
    if not results.references:
        return None
    sources: list[str] = []
    rows = []
    for configuration in results.configurations:
        published = results.references.get(configuration.label, {})
        own = configuration.best_metric
        names = [own, *COMPANIONS.get(own or "", ()), *published] if own else list(published)
        for metric in dict.fromkeys(names):
            if not configuration.has(metric, results.select):
                continue
            values = list(configuration.values(metric, results.select).values())
            stat = summarize(values)
            spread = f" ± {_points(metric, stat.std)}" if stat.n > 1 else ""
            median = float(np.median(values))
            figure, delta = "—", ""
            if metric in published:
                source = published[metric]["source"]
                if source not in sources:
                    sources.append(source)
                figure = f"{_points(metric, published[metric]['value'])} [{sources.index(source) + 1}]"
                ours = stat.mean if published[metric].get("statistic") == "mean" else median
                delta = _points(metric, ours - published[metric]["value"], sign=True)
            rows.append([configuration.label, plots.metric_name(metric), str(stat.n),
                         _points(metric, stat.mean) + spread, _points(metric, median), figure, delta])
    which = "the kept checkpoint (best on eval)" if results.select == "best" else "the last evaluation"
    note = ("Each configuration's own metric (the one its checkpoint is kept by) first, then its usual companion "
            "and any published one; metrics bounded by 1 in points (×100), as papers print them; metrics of "
            f"{which}. Δ: this study's median minus the published figure (its mean where the source gives "
            "means). "
            + " ".join(f"[{i}] {source}" for i, source in enumerate(sources, 1)))
    return Table("Against published figures", ["configuration", "metric", "runs", "mean ± std", "median",
                                               "published", "Δ"], rows, note)


def _points(metric: str, value: float, sign: bool = False) -> str:
    if metric in UNSCALED_METRICS:
        return f"{value:+.4f}" if sign else f"{value:.4f}"
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def cost_table(results: ResultSet) -> Table:
    header = ["configuration", "trainable params", "share", "train time (s)", "train samples/s", "eval samples/s",
              "peak RSS (MB)"]
    gpu = any("peak_gpu_memory_mb" in r.summary for c in results.configurations for r in c.runs)
    header += ["peak GPU (MB)"] if gpu else []
    rows = []
    for c in results.configurations:
        row = [c.label, f"{c.cost('trainable_params').mean:,.0f}", f"{100 * c.cost('trainable_share').mean:.3f}%",
               c.cost("train_seconds").text(1), c.cost("train_samples_per_s").text(1),
               c.cost("eval_samples_per_s").text(1), f"{c.cost('peak_rss_mb').mean:,.0f}"]
        rows.append(row + ([f"{c.cost('peak_gpu_memory_mb').mean:,.0f}"] if gpu else []))
    return Table("Cost", header, rows, "Time and throughput: mean ± std over seeds; memory: mean of each run's peak.")


def comparison_table(results: ResultSet) -> Table | None:
    if len(results.configurations) < 2:
        return None
    several = results.several_baselines
    metrics = [results.metric] + [m for m in ("accuracy",) if m != results.metric and m in _shared_metrics(results)]
    by_metric = {m: results.comparisons(m) for m in metrics}
    if not by_metric[results.metric]:
        return None
    header = ["configuration"] + (["baseline"] if several else []) + ["paired seeds"]
    for metric in metrics:
        header += [f"Δ {plots.metric_name(metric)}", "95% CI", "p"]
    header.append("verdict")
    rows = []
    for configuration in results.configurations:
        if configuration.label not in by_metric[results.metric]:  # a baseline
            continue
        base = results.baseline_of(configuration)
        first = by_metric[results.metric][configuration.label]
        row = [configuration.label] + ([base.label if base else results.baselines[configuration.label]]
                                       if several else []) + [str(first.pairs) if first else "—"]
        for metric in metrics:
            comparison = by_metric[metric][configuration.label]
            if comparison is None:
                row += ["—", "", ""]
                continue
            row += [f"{comparison.difference.mean:+.4f}", comparison.difference.interval(),
                    "" if math.isnan(comparison.p_value) else f"{comparison.p_value:.3f}"]
        verdict = first.verdict if first else (
            "baseline unfinished" if base is None else f"no {plots.metric_name(results.metric)}")
        rows.append(row + [verdict])
    overall = results.baseline_configuration()
    against = "its own baseline (the baseline cell nearest to it)" if several else overall.label
    note = (f"Against {against}, paired by seed (paired t-test, two-sided, 5%; the exact sign-flip test when "
            "every seed differs by the same amount). The verdict is on "
            f"{plots.metric_name(results.metric)}. With few seeds only large differences are detectable: "
            "'no detectable difference' is not proof of equality.")
    title = "Against each configuration's baseline" if several else f"Against the baseline: {overall.label}"
    return Table(title, header, rows, note)


def per_class_table(results: ResultSet) -> Table | None:
    """The best run's precision, recall and F1 per class, rarest last (where a rare class hides); none
    for a regression."""
    run = results.best_run()
    report = run.evaluation(results.select).get("per_class")
    if report is None:
        return None
    names = json.loads((run.path / LABELS).read_text(encoding="utf-8"))["labels"]
    names = sorted(names, key=lambda name: -report[name]["support"])
    rows = [[name, f"{report[name]['precision']:.4f}", f"{report[name]['recall']:.4f}",
             f"{report[name]['f1-score']:.4f}", str(int(report[name]["support"]))] for name in names]
    return Table(f"Per class, best run ({run.path.name})", ["class", "precision", "recall", "F1", "support"], rows,
                 "Sorted by support.")


def tables(results: ResultSet) -> list[Table]:
    return [t for t in (quality_table(results), reference_table(results), comparison_table(results),
                        cost_table(results), per_class_table(results)) if t is not None]


# --------------------------------------------------------------------------- the report


@dataclass
class Figure:
    file: str
    caption: str


def make_figures(results: ResultSet, directory: Path) -> list[Figure]:
    metric = plots.metric_name(results.metric)
    figures = [
        Figure(plots.quality_vs_cost(results, "trainable_params", directory / "quality_vs_params.png").name,
               f"{metric} against trainable parameters: up and to the left is better."),
        Figure(plots.quality_vs_cost(results, "train_seconds", directory / "quality_vs_time.png").name,
               f"{metric} against train time."),
        Figure(plots.learning_curves(results, directory / "learning_curves.png").name,
               "Learning curves: mean over seeds, band from the lowest to the highest seed."),
    ]
    for key in SWEEP_KEYS:
        if key in results.varying:
            made = plots.sweep_curve(results, key, directory / f"sweep_{key.rsplit('.', 1)[-1]}.png")
            if made:
                figures.append(Figure(made.name, f"{metric} against {key} (mean ± std over seeds)."))
    best = results.best_run()
    made = plots.reliability(best, results.select, f"reliability, {best.path.name}", directory / "reliability.png")
    if made:
        figures.append(Figure(made.name, f"Calibration of the best run, {best.path.name}: accuracy against "
                                         "confidence before and after temperature scaling, and the accuracy kept "
                                         "when the least confident texts are left unanswered."))
    if "confusion_matrix" not in best.evaluation(results.select):  # multi-label, regression
        return figures
    names = json.loads((best.path / LABELS).read_text(encoding="utf-8"))["labels"]
    figures.append(Figure(plots.confusion(best, results.select, names, f"confusion matrix, {best.path.name}",
                                          directory / "confusion_matrix.png").name,
                          f"Confusion matrix of the best run, {best.path.name}."))
    return figures


def write_report(paths: list[Path], out: Path | None = None) -> Path:
    """Collect, tabulate, plot; the report directory is built aside and swapped in whole."""
    paths = [Path(p) for p in paths]
    results = collect(paths)
    out = Path(out) if out else (paths[0] / REPORT_DIR if len(paths) == 1 else Path(REPORT_DIR))

    def build(directory: Path) -> None:
        directory.mkdir(parents=True)
        figures = make_figures(results, directory)
        made = tables(results)
        (directory / "report.md").write_text(_markdown(results, made, figures), encoding="utf-8")
        (directory / "report.html").write_text(_html(results, made, figures, directory), encoding="utf-8")

    _check_report_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_directory(build, out)
    return out


def _check_report_target(out: Path) -> None:
    """Only an earlier report (or nothing, or an empty directory) is replaced: `--out ~/docs` must not
    delete a user's folder."""
    if not os.path.lexists(out) or is_empty_dir(out):
        return
    if out.is_symlink() or not out.is_dir() or not (out / "report.md").is_file():
        raise RunError(f"{out} exists and is not a peftlab report; choose another --out (an earlier report, "
                       "an empty directory or a new path)")


def _facts(results: ResultSet) -> list[str]:
    runs = [r for c in results.configurations for r in c.runs]
    first = runs[0]
    seeds = sorted({r.seed for r in runs})
    data = first.summary.get("data", {})
    hardware = first.summary.get("hardware", {})
    device = hardware.get("gpu") or f"{hardware.get('cpu_count')} CPU cores"
    facts = [f"{len(results.configurations)} configurations, {len(runs)} finished runs, seeds {seeds}",
             f"model {first.summary.get('model')}; {data.get('n_train')} train / {data.get('n_eval')} eval examples"
             + (" (in the first run; the grid varies the data)" if "data.n_train" in results.varying else ""),
             f"headline metric {plots.metric_name(results.metric)}; hardware {device}",
             f"generated {time.strftime('%Y-%m-%d %H:%M')}"]
    if results.unfinished:
        facts.append(f"unfinished (not counted): {', '.join(p.name for p in results.unfinished)}")
    for name, error in results.failures.items():
        facts.append(f"failed: {name}: {error}")
    return facts


def _markdown(results: ResultSet, made: list[Table], figures: list[Figure]) -> str:
    parts = [f"# Study: {results.title}", ""]
    parts += [results.description, ""] if results.description else []
    parts += [f"- {fact}" for fact in _facts(results)] + [""]
    parts += [f"![{f.caption}]({f.file})\n\n*{f.caption}*\n" for f in figures[:1]]
    for table in made:
        parts += [table.markdown(), ""]
    parts += [f"![{f.caption}]({f.file})\n\n*{f.caption}*\n" for f in figures[1:]]
    return "\n".join(parts)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption,.note{color:#555;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{flex:1 1 480px}
"""


def _html(results: ResultSet, made: list[Table], figures: list[Figure], directory: Path) -> str:
    """Self-contained: the figures are embedded as data URIs, so the file can be mailed or attached."""

    def figure(f: Figure) -> str:
        data = base64.b64encode((directory / f.file).read_bytes()).decode()
        return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(f.caption)}'>"
                f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")

    facts = "".join(f"<li>{html.escape(fact)}</li>" for fact in _facts(results))
    description = f"<p>{html.escape(results.description)}</p>" if results.description else ""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Study: {html.escape(results.title)}"
            f"</title><style>{_STYLE}</style></head><body><h1>Study: {html.escape(results.title)}</h1>{description}"
            f"<ul>{facts}</ul><div class='grid'>{''.join(figure(f) for f in figures[:2])}</div>"
            f"{''.join(t.html() for t in made)}<div class='grid'>{''.join(figure(f) for f in figures[2:])}</div>"
            "</body></html>\n")


def compare_text(paths: list[Path]) -> str:
    """The terminal view: quality and comparison tables."""
    results = collect([Path(p) for p in paths])
    shown = [quality_table(results), reference_table(results), comparison_table(results)]
    return "\n\n".join(t.text() for t in shown if t is not None)
