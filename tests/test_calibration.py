"""Calibrated probabilities: temperature scaling fitted on the eval split, used by predict, serve and export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_serve import Server, status_and_json

from peftlab.calibration import (
    brier_score,
    calibrate,
    calibration_split,
    expected_calibration_error,
    fit_temperature,
    probabilities,
)
from peftlab.errors import ConfigError, DataError
from peftlab.runs import load_run
from peftlab.serving.adapters import ServedModel
from peftlab.serving.inference import Classifier
from peftlab.training.run import train


def sampled(temperature: float, n: int = 4000, classes: int = 3, seed: int = 0):
    """Over-confident logits: the labels follow softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, classes))
    chances = probabilities("single_label", logits, [temperature])
    labels = np.array([rng.choice(classes, p=p) for p in chances])
    return logits, labels


def test_the_fitted_temperature_is_the_one_the_labels_follow_and_it_lowers_ece():
    logits, labels = sampled(2.5)
    (temperature,) = fit_temperature("single_label", labels, logits)
    assert temperature == pytest.approx(2.5, rel=0.1)
    found = calibrate("single_label", labels, logits)
    assert found["ece_calibrated"] < found["ece"] / 2 and found["brier_calibrated"] < found["brier"]
    raw = probabilities("single_label", logits)
    assert (raw.argmax(-1) == probabilities("single_label", logits, found["temperature"]).argmax(-1)).all()


def test_multi_label_gets_a_temperature_per_label():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(5000, 2))
    truth = 1 / (1 + np.exp(-logits / np.array([0.5, 3.0])))
    labels = (rng.random(logits.shape) < truth).astype(np.float32)
    temperatures = fit_temperature("multi_label", labels, logits)
    assert temperatures == pytest.approx([0.5, 3.0], rel=0.15)
    assert calibrate("regression", labels[:, 0], logits[:, :1]) == {}


def test_ece_and_brier_by_hand():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45]])
    # bins: 0.9 right, 0.8 right, 0.6 wrong, 0.55 right (0.55 and 0.6 share the bin (0.533, 0.6])
    expected = (abs(1 - 0.9) + abs(1 - 0.8) + 2 * abs(0.5 - 0.575)) / 4
    assert expected_calibration_error("single_label", labels, probs) == pytest.approx(expected)
    assert brier_score("single_label", labels, probs) == pytest.approx(
        np.mean([2 * 0.1**2, 2 * 0.2**2, 2 * 0.6**2, 2 * 0.45**2]))


def test_a_held_out_fraction_fits_and_the_rest_measures():
    fit, measure = calibration_split(100, 0.3, seed=5)
    assert len(fit) == 30 and len(measure) == 70 and not set(fit) & set(measure)
    assert calibration_split(10, None, 0)[0].tolist() == calibration_split(10, None, 0)[1].tolist() == list(range(10))


def test_a_run_keeps_its_temperature_and_predict_serve_and_export_use_it(make_config, toy_files, tmp_path):
    from peftlab.serving.export import export_run
    from peftlab.serving.predict import predict_file

    config = make_config("bert", method={"kind": "full"}, data={"calibration_fraction": 0.5},
                         train={"epochs": 3, "lr": 2e-3})
    run = load_run(train(config))
    best = run.summary["best"]
    assert len(best["temperature"]) == 1 and {"ece", "ece_calibrated", "brier", "brier_calibrated"} <= set(best)
    texts = pd.read_csv(toy_files[1])["text"].tolist()[:8]
    calibrated = Classifier.from_run(run.path, device="cpu")
    raw = Classifier.from_run(run.path, device="cpu", raw=True)
    logits = np.log(raw.probabilities(texts))
    assert calibrated.probabilities(texts) == pytest.approx(
        probabilities("single_label", logits, best["temperature"]), abs=1e-5)
    out = tmp_path / "p.jsonl"
    predict_file(run.path, str(toy_files[1]), out, show_progress=False, abstain_below=0.9)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["abstain"] == (r["score"] < 0.9) for r in rows)
    with pytest.raises(DataError, match="--abstain-below 1.5: a probability strictly between 0 and 1"):
        predict_file(run.path, str(toy_files[1]), tmp_path / "q.jsonl", show_progress=False, abstain_below=1.5)
    exported = export_run(run.path, tmp_path / "export")
    assert json.loads((exported / "config.json").read_text())["calibration_temperature"] == best["temperature"]
    assert "calibrated" in (exported / "README.md").read_text()
    for served_from in (run.path, exported):
        with Server(ServedModel.from_model(served_from, device="cpu")) as server:
            status, answer = status_and_json(server.url, "/predict", {"inputs": texts[0]})
        assert status == 200
        assert {a["label"]: a["score"] for a in answer} == pytest.approx(
            dict(zip(run.labels, calibrated.probabilities(texts[:1])[0])), abs=1e-4)


def test_calibration_fraction_is_a_share():
    from peftlab.config_loading import validate_config

    with pytest.raises(ConfigError, match="calibration_fraction"):
        validate_config({"data": {"source": "tweets", "calibration_fraction": 1.0}})
