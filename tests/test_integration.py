"""The real packaged all-MiniLM-L6-v2 on real tweets (slow: seconds to minutes on 2 CPU cores)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peftlab.config_loading import load_config
from peftlab.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_single_run_command_runs_end_to_end_learns_and_eval_reproduces_it(tmp_path):
    """The shipped LoRA config on real tweets: beats the majority class with under 1% of the weights trained."""
    peftlab = [sys.executable, "-m", "peftlab"]
    overrides = [f"output.dir={tmp_path}", f"output.cache_dir={tmp_path / 'cache'}", "output.progress=false",
                 "train.epochs=1", "data.n_train=800", "data.n_eval=300"]  # the shipped config otherwise
    done = subprocess.run([*peftlab, "train", str(ROOT / "configs" / "tweets-lora.yaml"), *overrides],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resolved config:" in done.stdout
    run = tmp_path / load_config(ROOT / "configs" / "tweets-lora.yaml").output.name
    summary = load_run(run).summary
    assert summary["best"]["f1_macro"] > 0.5 and summary["data"]["n_train"] == 800
    eval_counts = np.array(list(summary["data"]["eval_class_counts"].values()))
    majority = eval_counts.max() / eval_counts.sum()
    assert summary["best"]["accuracy"] > majority + 0.05, (summary["best"]["accuracy"], majority)
    assert summary["trainable_share"] < 0.01
    again = subprocess.run([*peftlab, "eval", str(run)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "matches the run's saved best evaluation" in again.stdout, again.stderr[-3000:]


def test_quickstart_study_runs_end_to_end_and_writes_its_report(tmp_path):
    """The README's quick start, at smaller sizes: every method, a report, a rerun that does nothing."""
    command = [sys.executable, "-m", "peftlab", "study", str(ROOT / "studies" / "quickstart.yaml"), "seeds=1",
               "data.n_train=96", "data.n_eval=64", "train.epochs=1", f"output.dir={tmp_path}",
               f"output.cache_dir={tmp_path / 'cache'}", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study = tmp_path / "quickstart"
    assert sorted(p.name for p in study.iterdir()) == ["full-seed42", "ia3-seed42", "lora-seed42",
                                                       "loraplus-seed42", "report", "study.json"]
    assert f"report: {study / 'report' / 'report.html'}" in done.stdout
    markdown = (study / "report" / "report.md").read_text()
    assert "### Against the baseline: full" in markdown and "| ia3 | 1 |" in markdown
    again = subprocess.run([*command, "--no-report"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "(4 finished, 0 to run)" in again.stdout and "=== run" not in again.stdout
