"""output.report_to: runs logged to a real local MLflow store and TensorBoard event files, read back."""

from __future__ import annotations

import json

import pytest

import peftlab
from peftlab.runs import read_metrics
from peftlab.training.tracking import tracking_uri

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def mlflow_runs(output_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(output_dir))
    experiment = client.get_experiment_by_name("peftlab")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_run_reports_to_mlflow_and_tensorboard(make_config, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = make_config("bert", train={"epochs": 2}, output={"report_to": ["mlflow", "tensorboard"]})
    run = peftlab.train(config)
    evals = [r for r in read_metrics(run.path) if r["type"] == "eval"]
    trains = [r for r in read_metrics(run.path) if r["type"] == "train"]

    client, (logged,) = mlflow_runs(config.output.dir)
    assert (config.output.dir / "mlflow.db").is_file() and logged.info.status == "FINISHED"
    assert logged.data.tags["method"] == "lora" and logged.data.tags["seed"] == "42"
    assert logged.data.params["train.lr"] == str(config.train.lr) and logged.data.params["method.r"] == "4"
    history = client.get_metric_history(logged.info.run_id, "eval_f1_macro")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["f1_macro"])) for r in evals]
    assert len(client.get_metric_history(logged.info.run_id, "loss")) == len(trains)
    assert logged.data.metrics["best_f1_macro"] == pytest.approx(run.best["f1_macro"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"summary.json", "config.yaml", "metrics.jsonl", "model"} <= artifacts
    summary = json.loads(open(client.download_artifacts(logged.info.run_id, "summary.json")).read())
    assert summary["best"]["f1_macro"] == run.best["f1_macro"]

    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("eval/f1_macro")
    assert [(s.step, s.value) for s in scalars] == [(r["step"], pytest.approx(r["f1_macro"])) for r in evals]
    assert len(events.Scalars("train/loss")) == len(trains)


def test_a_tracker_that_fails_is_a_warning_and_the_run_goes_on(make_config, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nonsense://nowhere")
    config = make_config("bert", train={"epochs": 1}, output={"report_to": ["mlflow"]})
    with pytest.warns(UserWarning, match="output.report_to mlflow: .*the run goes on without mlflow"):
        run = peftlab.train(config)
    assert run.best["f1_macro"] is not None and (run.path / "model").is_dir()


def test_a_study_is_a_parent_run_with_its_runs_as_children(make_study, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = make_study(seeds=2)
    result = peftlab.study(path, progress=False, write_report=True, train={"epochs": 1},
                           output={"report_to": ["mlflow"]})
    client, logged = mlflow_runs(result.directory)
    parent, *children = logged
    assert parent.data.tags["peftlab"] == "study" and parent.info.run_name == "toy-study"
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert sorted(c.data.tags["seed"] for c in children) == ["42", "43"]
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


def test_a_search_is_a_parent_run_with_its_trials_as_children(tiny_models, toy_files, tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    from test_tune import write_tune

    from peftlab.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_tune(tiny_models, toy_files, tmp_path, train={"epochs": 1}, trials=2, pruner="none",
                      space={"method.r": [2, 4]})
    assert main(["tune", str(path), "output.report_to=[mlflow]"]) == 0
    _, logged = mlflow_runs(tmp_path / "runs" / "toy-tune")
    parent, *trials = logged
    assert parent.data.tags["peftlab"] == "tune" and parent.info.run_name == "toy-tune" and len(trials) == 2
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert sorted(t.info.run_name for t in trials) == ["trial-0000", "trial-0001"]
