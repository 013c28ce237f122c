import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.errors import ConfigError, StudyError
from peftlab.runs import is_finished
from peftlab.studies.running import run_study
from peftlab.studies.study import STUDY_FILE, load_study

ROOT = Path(__file__).resolve().parents[1]


def test_grid_expands_and_collapses_keys_that_do_not_apply(make_study):
    study = load_study(make_study(grid={"method.kind": ["full", "lora", "ia3"], "method.r": [1, 8]}, seeds=2))
    assert [c.label for c in study.cells] == ["full", "lora, r=1", "lora, r=8", "ia3"]
    assert study.collapsed == 2  # full and ia3 have no rank: r=1 and r=8 are the same run
    runs = study.runs
    assert len(runs) == 8 and len({r.path for r in runs}) == 8
    assert {r.seed for r in runs} == {42, 43}
    by_name = {r.path.name: r.config for r in runs}
    assert by_name["lora_r8-seed43"].method.r == 8 and by_name["lora_r8-seed43"].train.seed == 43
    assert by_name["full-seed42"].method.kind == "full" and not hasattr(by_name["full-seed42"].method, "r")
    assert all(r.config.output.overwrite is False and r.path.parent == study.directory for r in runs)
    assert study.directory.name == "toy-study"


def test_variants_cross_the_grid_and_keep_their_own_settings(make_study):
    study = load_study(make_study(
        variants={"full": {"method.kind": "full", "train.lr": 5e-5}, "lora": {"method.kind": "lora", "train.lr": 5e-3}},
        grid={"data.n_train": [100, 200]}, seeds=[7]))
    assert [c.label for c in study.cells] == ["full, n_train=100", "full, n_train=200",
                                              "lora, n_train=100", "lora, n_train=200"]
    configs = {r.path.name: r.config for r in study.runs}
    assert configs["full_n_train200-seed7"].train.lr == 5e-5 and configs["full_n_train200-seed7"].data.n_train == 200
    assert configs["lora_n_train100-seed7"].train.lr == 5e-3


def test_a_bad_grid_key_fails_before_anything_runs_naming_the_cell_and_key(make_study, tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)cell lora, rr=2.*method.rr: unknown key"):
        load_study(make_study(grid={"method.kind": ["lora"], "method.rr": [2]}))
    with pytest.raises(StudyError, match=r"seedz: Extra inputs"):
        load_study(make_study(seedz=2))
    with pytest.raises(StudyError, match="grid.method.r has no values"):
        load_study(make_study(grid={"method.r": []}))
    assert not (tmp_path / "runs").exists()


def test_baseline_by_label_or_keys_and_overrides(make_study):
    path = make_study(grid={"method.kind": ["lora", "full"]}, baseline={"method.kind": "full"})
    assert load_study(path).baseline_label() == "full"
    study = load_study(path, ["seeds=3", "data.n_train=120", "baseline=lora"])
    assert study.spec.seed_list() == [42, 43, 44] and study.baseline_label() == "lora"
    assert all(r.config.data.n_train == 120 for r in study.runs)
    with pytest.raises(StudyError, match="baseline 'dora' matches no cell"):
        load_study(path, ["baseline=dora"]).baseline_label()


def test_study_runs_every_cell_once_and_a_second_call_skips_them(make_study, capsys):
    path = make_study(grid={"method.kind": ["full", "lora"]}, seeds=2)
    study = load_study(path)
    assert run_study(study, progress=False) == {}
    assert all(is_finished(r.path) for r in study.runs)
    record = json.loads((study.directory / STUDY_FILE).read_text())
    assert [c["label"] for c in record["cells"]] == ["full", "lora"] and record["baseline"] == "full"
    stamps = {r.path: (r.path / "summary.json").stat().st_mtime_ns for r in study.runs}
    out = capsys.readouterr().out
    assert "run 2/4: full-seed43" in out and "left" in out  # progress with an estimate

    assert run_study(load_study(path), progress=False) == {}
    assert {r.path: (r.path / "summary.json").stat().st_mtime_ns for r in study.runs} == stamps
    assert "=== run" not in capsys.readouterr().out

    # Same run names, different experiment: refused rather than silently mixed.
    with pytest.raises(StudyError, match=r"lr: 0.005 there, 0.001 here"):
        run_study(load_study(path, ["train.lr=1e-3"]), progress=False)


def test_dry_run_lists_the_plan_and_writes_nothing(make_study, tmp_path, capsys):
    path = make_study(grid={"method.kind": ["full", "lora"], "method.r": [2, 4]})
    assert main(["study", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 configurations × 1 seeds = 3 runs (0 finished, 3 to run)" in out
    assert "1 grid combination(s) collapsed" in out and "[todo] lora_r4-seed42" in out
    assert not (tmp_path / "runs").exists()

@pytest.mark.slow

def test_killed_study_resumes_without_losing_or_repeating_runs(make_study, tmp_path):
    """SIGKILL while the second of two runs trains; the restart redoes only that one."""
    path = make_study(grid={"method.kind": ["lora", "full"]}, seeds=1)
    study = load_study(path, ["train.epochs=3"])
    command = [sys.executable, "-m", "peftlab", "study", str(path), "train.epochs=3", "--no-report", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    first, second = study.runs[0].path, study.runs[1].path
    deadline = time.monotonic() + 120
    second_log = second.with_name(second.name + ".incomplete") / "metrics.jsonl"
    while not (is_finished(first) and second_log.exists() and second_log.stat().st_size):  # inside its training
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the study never reached its second run's training"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = (first / "summary.json").read_bytes()
    assert not is_finished(second)

    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (first / "summary.json").read_bytes() == finished_before  # untouched
    assert all(is_finished(r.path) for r in study.runs)
    children = sorted(p.name for p in study.directory.iterdir() if p.is_dir())
    assert children == sorted(r.path.name for r in study.runs)  # nothing duplicated, nothing half-written
    for run in study.runs:
        evals = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["type"] == "eval"]
        assert [e["epoch"] for e in evals] == [1, 2, 3]  # the redone run did not append to the killed one


@pytest.mark.parametrize("path", sorted((ROOT / "studies").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_study_expands_and_validates(path):
    study = load_study(path)
    assert study.cells and study.baseline_label() in [c.label for c in study.cells]
    assert len({r.path for r in study.runs}) == len(study.runs)
    offline = path.parent.name == "offline" or path.stem == "quickstart"
    assert all((r.config.model.name == "minilm") == offline for r in study.runs)


def test_each_hub_preset_has_an_offline_twin_with_the_same_grid():
    presets = sorted((ROOT / "studies").glob("[a-e]-*.yaml"))
    twins = {p.stem[0]: p for p in (ROOT / "studies" / "offline").glob("*.yaml")}
    assert [p.stem[0] for p in presets] == list("abcde")
    for preset in presets:
        hub, twin = load_study(preset), load_study(twins[preset.stem[0]])
        for aspect in (lambda c: c.config.method.kind, lambda c: getattr(c.config.method, "r", None),
                       lambda c: getattr(c.config.method, "dropout", None)):
            assert {aspect(c) for c in twin.cells} == {aspect(c) for c in hub.cells}, preset.name
        assert twin.spec.seed_list() == hub.spec.seed_list()


def test_a_diverging_run_is_reported_and_the_others_go_on(make_study, monkeypatch, capsys):
    import peftlab.training.run as train_module
    from peftlab.studies.report import write_report

    real_apply = train_module.apply_method

    def full_diverges(model, method):
        model = real_apply(model, method)
        if method.kind == "full":
            model.classifier.register_forward_hook(lambda module, args, output: output * float("nan"))
        return model

    monkeypatch.setattr(train_module, "apply_method", full_diverges)
    study = load_study(make_study(grid={"method.kind": ["lora", "full"]}, seeds=1))
    failures = run_study(study, progress=False)
    assert list(failures) == ["full-seed42"] and "the loss became nan at step 1" in failures["full-seed42"]
    assert is_finished(study.directory / "lora-seed42") and not is_finished(study.directory / "full-seed42")
    record = json.loads((study.directory / STUDY_FILE).read_text())
    assert list(record["failures"]) == ["full-seed42"]
    markdown = (write_report([study.directory]) / "report.md").read_text()
    assert "failed: full-seed42: the loss became nan" in markdown
    assert "unfinished (not counted): full-seed42.incomplete" in markdown
