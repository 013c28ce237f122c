import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from browser_check import browser_missing_reason, check_page
from conftest import write_study

from peftlab.cli import main
from peftlab.runs import RunError
from peftlab.studies.report import write_report
from peftlab.studies.results import collect
from peftlab.studies.running import run_study
from peftlab.studies.study import load_study

FIGURES = {"quality_vs_params.png", "quality_vs_time.png", "learning_curves.png", "sweep_r.png",
           "confusion_matrix.png", "reliability.png"}


@pytest.fixture(scope="module")
def finished_study(tiny_models, toy_files, tmp_path_factory) -> Path:
    """A rank sweep with a full fine-tuning reference, two seeds, on the tiny model."""
    root = tmp_path_factory.mktemp("study")
    path = write_study(tiny_models, toy_files, root, "sweep", seeds=2, baseline="full",
                       grid={"method.kind": ["full", "lora"], "method.r": [2, 4]})
    study = load_study(path)
    assert run_study(study, progress=False) == {}
    return study.directory


def test_report_has_every_table_and_figure(finished_study):
    out = write_report([finished_study])
    assert out == finished_study / "report"
    assert FIGURES <= {p.name for p in out.glob("*.png")}
    markdown = (out / "report.md").read_text()
    for figure in FIGURES:
        assert f"({figure})" in markdown
    for title in ("### Quality", "### Against the baseline: full", "### Cost", "### Per class"):
        assert title in markdown
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert {"full", "lora, r=2", "lora, r=4"} <= set(rows)
    quality = markdown.split("### Quality")[1].split("###")[0]
    assert "| ECE |" in quality and "| ECE calibrated |" in quality
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(FIGURES)  # self-contained


def test_report_numbers_are_the_seed_statistics_of_the_runs(finished_study):
    results = collect([finished_study])
    lora = next(c for c in results.configurations if c.label == "lora, r=4")
    f1 = [json.loads((run.path / "summary.json").read_text())["best"]["f1_macro"] for run in lora.runs]
    assert len(f1) == 2
    markdown = write_report([finished_study]).joinpath("report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| lora, r=4 | 2 |"))
    assert f"{np.mean(f1):.4f} ± {np.std(f1, ddof=1):.4f}" in row
    comparison = next(line for line in markdown.splitlines()
                      if line.startswith("| lora, r=4 |") and "| 2 | " in line and re.search(r"\| [+-]\d", line))
    full = next(c for c in results.configurations if c.label == "full")
    deltas = [lora.values("f1_macro", "best")[s] - full.values("f1_macro", "best")[s] for s in (42, 43)]
    assert f"{np.mean(deltas):+.4f}" in comparison


def test_compare_prints_a_table_and_infers_labels_without_a_study(finished_study, capsys):
    runs = sorted(p for p in finished_study.iterdir() if p.name.startswith("lora"))
    assert main(["compare", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "Quality" in out and "Against the baseline: r=2" in out
    assert re.search(r"^r=4\s+2\s+\d\.\d{4} ± ", out, re.M)


def test_report_lists_unfinished_runs_and_replaces_the_previous_report(finished_study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_study, copy)
    (copy / "lora_r8-seed42.incomplete").mkdir()
    write_report([copy])
    markdown = (copy / "report" / "report.md").read_text()
    assert "unfinished (not counted): lora_r8-seed42.incomplete" in markdown
    (copy / "report" / "stale.txt").write_text("old")
    write_report([copy])
    assert not (copy / "report" / "stale.txt").exists()
    assert not [p for p in copy.iterdir() if p.name.startswith(".report")]  # no temp dirs left


def test_report_never_replaces_a_directory_that_is_not_a_report(finished_study, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    with pytest.raises(RunError, match="is not a peftlab report"):
        write_report([finished_study], out=folder)
    assert (folder / "mine.txt").read_text() == "keep me"
    assert write_report([finished_study], out=tmp_path / "empty-or-new") == tmp_path / "empty-or-new"


def test_report_of_no_finished_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no finished runs in" in capsys.readouterr().err


def test_html_report_renders_in_a_real_browser(finished_study, tmp_path):
    reason = browser_missing_reason()
    if reason:
        pytest.skip(reason)
    out = write_report([finished_study])
    screenshot = out / "screenshot.png"
    page = check_page(out / "report.html", screenshot)
    assert page.title == "Study: sweep"
    assert page.console_errors == []
    assert page.images == len(FIGURES) and page.broken_images == []
    assert screenshot.stat().st_size > 10_000


def test_a_window_length_sweep_is_plotted_as_one_line_per_mode(tiny_models, toy_files, tmp_path):
    """data.stride follows model.max_length (a quarter of it): one line per mode, not a point per stride."""
    from peftlab.studies import plots

    path = write_study(tiny_models, toy_files, tmp_path, "windows", seeds=1, train={"epochs": 1},
                       grid={"model.max_length": [16, 32], "data.long_texts": ["truncate", "chunks"]})
    study = load_study(path)
    assert run_study(study, progress=False) == {}
    results = collect([study.directory])
    assert {"model.max_length", "data.stride", "data.long_texts"} <= set(results.varying)
    assert plots._follows(results, "data.stride", "model.max_length")
    assert not plots._follows(results, "data.long_texts", "model.max_length")
    out = write_report([study.directory])
    assert "(sweep_max_length.png)" in (out / "report.md").read_text()
