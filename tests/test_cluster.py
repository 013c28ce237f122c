"""The Ray backend of `peftlab study`, on a local 2-CPU Ray started by the command itself."""

import json
import subprocess
import sys
import time

import pytest
from conftest import write_study

from peftlab.runs import is_finished, read_metrics
from peftlab.studies.running import run_study
from peftlab.studies.study import load_study

pytest.importorskip("ray")


def study_cli(path, *args, wait=True):
    command = [sys.executable, "-m", "peftlab", "study", str(path), "--no-progress", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def quality_section(report_dir):
    text = (report_dir / "report.md").read_text()
    return text[text.index("### Quality"): text.index("### Against the baseline")]

@pytest.mark.slow

def test_the_ray_backend_writes_the_same_runs_and_report_as_the_local_one(tiny_models, toy_files, tmp_path):
    grid = {"method.r": [2, 4]}
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local = write_study(tiny_models, toy_files, tmp_path / "local", grid=grid, seeds=2)
    on_ray = write_study(tiny_models, toy_files, tmp_path / "ray", grid=grid, seeds=2, resources={"cpu": 1})
    assert not run_study(load_study(local), progress=False)
    from peftlab.studies.report import write_report

    write_report([tmp_path / "local" / "runs" / "toy-study"])
    result = study_cli(on_ray, "--backend", "ray")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ray: 4 run(s) on 2 CPU(s)" in result.stdout and result.stdout.count("finished;") == 4
    runs = {}
    for side in ("local", "ray"):
        root = tmp_path / side / "runs" / "toy-study"
        runs[side] = {p.name: json.loads((p / "summary.json").read_text())["best"]
                      for p in root.iterdir() if is_finished(p)}
    assert sorted(runs["ray"]) == sorted(runs["local"]) and len(runs["ray"]) == 4
    for name, best in runs["local"].items():
        assert runs["ray"][name]["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-6), name
        assert runs["ray"][name]["confusion_matrix"] == best["confusion_matrix"], name
    assert quality_section(tmp_path / "ray" / "runs" / "toy-study" / "report") == \
        quality_section(tmp_path / "local" / "runs" / "toy-study" / "report")


def kill_when_mid_run(process, study_dir, finished_first: str, killed: str):
    """Once `finished_first` is done and `killed` has a checkpoint, SIGKILL every worker running a run."""
    deadline = time.monotonic() + 300
    checkpoints = study_dir / f"{killed}.incomplete" / "checkpoints"
    while not (is_finished(study_dir / finished_first) and checkpoints.exists() and any(checkpoints.glob("step-*"))):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.1)
    assert subprocess.run(["pkill", "-9", "-f", "ray::_train_cell"]).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("retries", [1, 0])
def test_a_lost_worker_leaves_no_finished_run_and_is_retried_or_reported(tiny_models, toy_files, tmp_path,
                                                                         retries):
    path = write_study(tiny_models, toy_files, tmp_path, grid={"train.epochs": [1, 10]},
                       train={"checkpoint_every": 5})
    study_dir = tmp_path / "runs" / "toy-study"
    process = study_cli(path, "--backend", "ray", "--retries", retries, wait=False)
    kill_when_mid_run(process, study_dir, "epochs1-seed42", "epochs10-seed42")
    output = process.communicate(timeout=300)[0]
    assert is_finished(study_dir / "epochs1-seed42")
    finished_at = (study_dir / "epochs1-seed42" / "summary.json").stat().st_mtime
    if retries:  # Ray ran it again; it resumed from its checkpoint and finished
        assert process.returncode == 0, output[-3000:]
        assert is_finished(study_dir / "epochs10-seed42")
        evals = [r for r in read_metrics(study_dir / "epochs10-seed42") if r["type"] == "eval"]
        assert [r["epoch"] for r in evals] == list(range(1, 11))  # resumed: no epoch lost or logged twice
        return
    assert process.returncode == 1 and "epochs10-seed42" in output and "failed" in output, output[-3000:]
    assert not (study_dir / "epochs10-seed42").exists()  # nothing that looks finished
    assert (study_dir / "epochs10-seed42.incomplete").is_dir()
    again = study_cli(path)  # the local backend finishes only what is missing
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "run 1/1: epochs10-seed42" in again.stdout and "resumed at step" in again.stdout
    assert is_finished(study_dir / "epochs10-seed42")
    assert (study_dir / "epochs1-seed42" / "summary.json").stat().st_mtime == finished_at
