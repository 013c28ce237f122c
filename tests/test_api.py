"""The Python API (`import peftlab`): train, study, report, load; user errors raise, never exit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from test_train import LEARNABLE

import peftlab
from peftlab.errors import ConfigError, RunError, StudyError
from peftlab.serving.inference import Prediction


def test_import_peftlab_loads_no_torch():
    # `import peftlab` must stay light: the command line's --help and notebooks' first cell.
    code = "import sys, peftlab; assert 'torch' not in sys.modules, 'torch'; print(sorted(peftlab.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "study" in out and "load" in out


def test_train_takes_a_dict_a_path_or_a_config_with_keyword_overrides(make_config, tmp_path):
    raw = make_config("bert").model_dump(mode="json")
    run = peftlab.train(raw, train={"epochs": 1}, **{"output.name": "from-dict"})
    assert isinstance(run, peftlab.Run) and run.path.name == "from-dict" and run.config.train.epochs == 1
    assert run.config.train.batch_size == 16  # a section given as a dict changes only the keys it names
    metrics = run.metrics
    assert isinstance(metrics, pd.DataFrame) and set(metrics["type"]) == {"train", "eval"}
    evals = metrics[metrics["type"] == "eval"]
    assert len(evals) == 1 and evals["f1_macro"].iloc[0] == pytest.approx(run.best["f1_macro"])
    assert "per_class" not in metrics.columns  # numbers only; the nested figures stay in the summary
    assert "f1_macro" in repr(run)

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    from_path = peftlab.train(path, train={"epochs": 1}, output={"name": "from-path"})
    typed = peftlab.train(make_config("bert"), train={"epochs": 1}, output={"name": "from-config"})
    # Another method kind: the LoRA keys it has none of are dropped, as in a study's variants.
    full = peftlab.train(raw, method={"kind": "full"}, train={"epochs": 1, "lr": 1e-3}, output={"name": "full"})
    assert full.config.method.kind == "full" and full.summary["trainable_share"] == 1.0
    # The same config and seed whichever way it came: the same model.
    assert from_path.best["eval_loss"] == pytest.approx(run.best["eval_loss"], abs=1e-6)
    assert typed.best["eval_loss"] == pytest.approx(run.best["eval_loss"], abs=1e-6)


def test_a_loaded_run_predicts_labels_and_probabilities(make_config):
    method, lr = LEARNABLE["full"]
    run = peftlab.train(make_config("bert", method=method), train={"epochs": 6, "lr": lr, "warmup_ratio": 0.1},
                        output={"name": "predictor"})
    classifier = peftlab.load(run.path)
    texts = ["w1 good w2", "w3 bad w4 w5", "w6 great"]
    probabilities = classifier.predict_proba(texts)
    assert probabilities.shape == (3, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    predictions = classifier.predict(texts)
    assert all(isinstance(p, Prediction) for p in predictions)
    assert [p.label for p in predictions] == [run.labels[i] for i in probabilities.argmax(axis=1)]
    assert [p.labels for p in predictions] == [[p.label] for p in predictions]
    assert predictions[0].probabilities == pytest.approx(dict(zip(run.labels, probabilities[0])))
    assert predictions[0].score == pytest.approx(probabilities[0].max())
    assert run.best["accuracy"] >= 0.9 and [p.label for p in predictions] == ["pos", "neg", "pos"]
    single = classifier.predict("w1 good w2")  # one text: a list of one
    assert len(single) == 1 and single[0].label == predictions[0].label
    assert run.classifier().predict_proba(texts) == pytest.approx(probabilities)


def test_user_errors_raise_the_command_lines_errors(make_config, tmp_path):
    raw = make_config("bert").model_dump(mode="json")
    with pytest.raises(ConfigError, match="train.epochs"):
        peftlab.train(raw, train={"epochs": 0})
    with pytest.raises(ConfigError, match="train.nonsense"):
        peftlab.train(raw, **{"train.nonsense": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        peftlab.train(tmp_path / "missing.yaml")
    with pytest.raises(RunError, match="does not exist"):
        peftlab.load(tmp_path / "no-run")
    with pytest.raises(StudyError, match="backend"):
        peftlab.study({"name": "x", "config": raw}, backend="spark")
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_study_gives_its_table_and_report(make_study, tmp_path):
    path = make_study(variants={"r2": {"method.r": 2}, "r4": {"method.r": 4}}, seeds=2)
    result = peftlab.study(path, progress=False, train={"epochs": 1})
    assert result.failures == {} and len(result.runs) == 4
    table = result.table()
    assert list(table.index) == ["r2", "r4"] and (table["runs"] == 2).all()
    for label in table.index:
        values = [r.best["f1_macro"] for r in result.runs if r.config.method.r == int(label[1:])]
        assert table.loc[label, "f1_macro"] == pytest.approx(np.mean(values))
        assert table.loc[label, "f1_macro_std"] == pytest.approx(np.std(values, ddof=1))
        low, mean, high = table.loc[label, ["f1_macro_ci_low", "f1_macro", "f1_macro_ci_high"]]
        assert low <= mean <= high
    page = result.report()
    assert page.name == "report.html" and page.is_file() and "Study: toy-study" in page.read_text(encoding="utf-8")
    assert peftlab.report(result.directory, out=tmp_path / "again").is_file()
    # Called again, the study keeps its finished runs.
    again = peftlab.study(path, progress=False, train={"epochs": 1})
    assert [r.summary["finished_at"] for r in again.runs] == [r.summary["finished_at"] for r in result.runs]
