"""Multi-label and regression: read, trained with their own head and loss, scored and answered as such."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
from conftest import FILLER, NEGATIVE, POSITIVE, write_study
from test_cuda_graphs import _evals
from test_serve import Server, status_and_json
from test_train import LEARNABLE

from peftlab.config_loading import validate_config
from peftlab.errors import ConfigError, DataError
from peftlab.metrics import multi_label_metrics, regression_metrics
from peftlab.runs import load_run
from peftlab.serving.adapters import ServedModel
from peftlab.serving.inference import Classifier, calibrated_thresholds
from peftlab.splits import prepare_splits
from peftlab.training.reevaluate import evaluate_run
from peftlab.training.run import train


def multi_label_rows(n: int, seed: int) -> pd.DataFrame:
    """Tags: `pos` if a positive word is in the text, `neg` if a negative one: none, one or both."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 10))]
        tags = [tag for tag in ("pos", "neg") if rng.random() < 0.5]
        for tag in tags:
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if tag == "pos" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": ";".join(tags)})
    return pd.DataFrame(rows)


def regression_rows(n: int, seed: int) -> pd.DataFrame:
    """Target: positive words minus negative words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        for word in [rng.choice(POSITIVE) for _ in range(good)] + [rng.choice(NEGATIVE) for _ in range(bad)]:
            words.insert(rng.randint(0, len(words)), word)
        rows.append({"text": " ".join(words), "label": float(good - bad)})
    return pd.DataFrame(rows)


def _files(tmp_path, rows, suffix="csv"):
    paths = []
    for name, frame in (("train", rows(240, 1)), ("eval", rows(80, 2))):
        path = tmp_path / f"{name}.{suffix}"
        frame.to_csv(path, index=False) if suffix == "csv" else frame.to_json(path, orient="records", lines=True)
        paths.append(str(path))
    return {"train_file": paths[0], "eval_file": paths[1]}


def test_multi_label_cells_are_read_from_lists_or_separated_strings(tmp_path):
    frame = pd.DataFrame({"text": ["a b", "c d", "e f"], "label": [["x", "y"], [], ["y"]]})
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    splits = prepare_splits(validate_config({"data": {"train_file": str(tmp_path / "t.jsonl"), "task": "multi_label",
                                                      "eval_fraction": 0.34}}).data)
    assert splits.labels.names == ["x", "y"] and splits.labels.task == "multi_label"
    rows = np.concatenate([splits.train_ids, splits.eval_ids])
    assert sorted(map(tuple, rows.tolist())) == [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)]  # no label is valid
    pd.DataFrame({"text": ["a", "b"], "label": ["x|y", "z"]}).to_csv(tmp_path / "t.csv", index=False)
    data = validate_config({"data": {"train_file": str(tmp_path / "t.csv"), "eval_file": str(tmp_path / "t.csv"),
                                     "task": "multi_label", "label_separator": "|"}}).data
    assert prepare_splits(data).labels.names == ["x", "y", "z"]


def test_bad_task_input_fails_naming_the_row(tmp_path):
    pd.DataFrame({"text": ["a", "b"], "label": ["1.5", "lots"]}).to_csv(tmp_path / "r.csv", index=False)
    data = validate_config({"data": {"train_file": str(tmp_path / "r.csv"), "task": "regression"}}).data
    with pytest.raises(DataError, match=r"r.csv: row 2, column 'label': target 'lots' is not a number"):
        prepare_splits(data)
    pd.DataFrame({"text": ["a"], "label": [{"x": 1}]}).to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    data = validate_config({"data": {"train_file": str(tmp_path / "m.jsonl"), "task": "multi_label"}}).data
    with pytest.raises(DataError, match=r"m.jsonl: row 1, column 'label': labels .* are neither a list"):
        prepare_splits(data)
    with pytest.raises(ConfigError, match="train.best_metric=f1_macro is not a metric of data.task=regression"):
        validate_config({"data": {"source": "tweets", "task": "regression"}, "train": {"best_metric": "f1_macro"}})
    with pytest.raises(ConfigError, match="data.sampler=balanced draws each class alike"):
        validate_config({"data": {"source": "tweets", "task": "regression", "sampler": "balanced"}})


def test_multi_label_and_regression_metrics():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probabilities = np.array([[0.9, 0.2], [0.3, 0.8], [0.7, 0.4], [0.1, 0.1]])
    metrics = multi_label_metrics(labels, probabilities, probabilities >= 0.5, ["a", "b"])
    assert metrics["subset_accuracy"] == 0.75 and metrics["hamming_loss"] == 0.125
    assert metrics["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))
    assert metrics["roc_auc_macro"] == 1.0 and metrics["per_class"]["b"]["support"] == 2
    targets = np.array([1.0, 2.0, 3.0, 4.0])
    values = np.array([1.1, 1.9, 3.2, 3.8])
    scores = regression_metrics(targets, values)
    assert scores["spearman"] == 1.0 and scores["pearson"] > 0.99 and scores["mae"] == pytest.approx(0.15)
    assert np.isnan(regression_metrics(targets, np.ones(4))["pearson"])  # a constant prediction


def test_a_multi_label_run_trains_a_sigmoid_head_and_predicts_every_label_above_the_threshold(make_config, tmp_path):
    kind, lr = LEARNABLE["full"]
    config = make_config("bert", method=kind, data={**_files(tmp_path, multi_label_rows), "task": "multi_label",
                                                     "label_separator": ";"},
                         train={"epochs": 10, "lr": lr, "warmup_ratio": 0.1})
    run = load_run(train(config))
    assert run.config.train.best_metric == "f1_micro" and run.labels == ["neg", "pos"]
    best = run.summary["best"]
    assert best["f1_micro"] >= 0.8 and 0 <= best["hamming_loss"] <= 0.2, best
    assert run.summary["data"]["train_class_counts"].keys() == {"neg", "pos"}
    assert evaluate_run(run.path)["f1_micro"] == pytest.approx(best["f1_micro"])
    classifier = Classifier.from_run(run.path, device="cpu")
    assert classifier.model.config.problem_type == "multi_label_classification"
    answers = classifier.label_rows(classifier.probabilities(["w1 good w2 bad", "w3 w4", "lovely w5"]))
    assert [a["labels"] for a in answers] == [["neg", "pos"], [], ["pos"]]
    assert set(answers[0]["probabilities"]) == {"neg", "pos"}
    with Server(ServedModel.from_model(run.path, device="cpu")) as server:
        status, served = status_and_json(server.url, "/predict", {"inputs": ["w1 good w2 bad", "w3 w4"]})
    assert status == 200 and [sorted(e["label"] for e in answer if e["predicted"]) for answer in served] == \
        [["neg", "pos"], []]
    assert served[0][0]["score"] == pytest.approx(max(answers[0]["probabilities"].values()), abs=1e-5)


def test_a_regression_run_trains_one_output_and_predicts_numbers(make_config, tmp_path):
    kind, lr = LEARNABLE["full"]
    config = make_config("bert", method=kind, data={**_files(tmp_path, regression_rows, "jsonl"), "task": "regression"},
                         train={"epochs": 10, "lr": lr, "warmup_ratio": 0.1})
    run = load_run(train(config))
    assert run.config.train.best_metric == "pearson" and run.labels == ["score"]
    best = run.summary["best"]
    assert best["pearson"] >= 0.8 and best["mse"] < 2.0, [(e["epoch"], round(e["pearson"], 3), round(e["mse"], 3))
                                                         for e in _evals(run.path)]
    assert set(run.summary["data"]["train_class_counts"]) == {"mean", "std", "min", "max"}
    classifier = Classifier.from_run(run.path, device="cpu")
    values = classifier.probabilities(["good great lovely w1", "bad awful poor w2", "w3 w4"])
    answers = classifier.label_rows(values)
    assert answers[0]["score"] > answers[2]["score"] > answers[1]["score"]
    with Server(ServedModel.from_model(run.path, device="cpu")) as server:
        status, served = status_and_json(server.url, "/predict", {"inputs": "good great lovely w1"})
    assert status == 200 and served == [{"label": "score", "score": pytest.approx(answers[0]["score"], abs=1e-5)}]


def test_label_range_trains_on_0_1_and_answers_in_the_targets_unit(make_config, tmp_path):
    kind, lr = LEARNABLE["full"]
    files = _files(tmp_path, regression_rows, "jsonl")
    config = make_config("bert", method=kind, data={**files, "task": "regression", "label_range": [-3, 3]},
                         train={"epochs": 10, "lr": lr, "warmup_ratio": 0.1})
    run = load_run(train(config))
    assert json.loads((run.model_dir / "config.json").read_text())["label_range"] == [-3.0, 3.0]
    eval_rows = pd.read_json(files["eval_file"], lines=True)
    classifier = Classifier.from_run(run.path, device="cpu")
    values = classifier.probabilities(eval_rows.text.tolist())
    # Scored in the targets' unit: the kept evaluation's error is that of the answers.
    final = run.summary["final"]
    assert final["mse"] == pytest.approx(float(np.mean((values - eval_rows.label) ** 2)), rel=1e-3)
    assert final["pearson"] >= 0.8 and values.max() > 1.5 and values.min() < -1.5
    with Server(ServedModel.from_model(run.path, device="cpu")) as server:
        status, served = status_and_json(server.url, "/predict", {"inputs": eval_rows.text[0]})
    assert status == 200 and served[0]["score"] == pytest.approx(float(values[0]), abs=1e-4)
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"text": "a b", "label": 1}\n{"text": "c d", "label": 7.5}\n', encoding="utf-8")
    data = validate_config({"data": {"train_file": str(outside), "task": "regression", "label_range": [0, 5]}}).data
    with pytest.raises(DataError, match=r"outside.jsonl: row 2: target 7.5 is outside data.label_range \[0, 5\]"):
        prepare_splits(data)
    with pytest.raises(ConfigError, match="data.label_range scales regression targets; data.task is single_label"):
        validate_config({"data": {"source": "tweets", "label_range": [0, 1]}})
    with pytest.raises(ConfigError, match="low must be below high"):
        validate_config({"data": {"source": "stsb", "task": "regression", "label_range": [5, 0]}})


@pytest.mark.parametrize("task,rows,metric", [("regression", regression_rows, "pearson"),
                                              ("multi_label", multi_label_rows, "f1_micro")])
def test_a_study_of_another_task_reports_its_own_metrics(tiny_models, tmp_path, task, rows, metric):
    import yaml

    from peftlab.studies.report import write_report
    from peftlab.studies.running import run_study
    from peftlab.studies.study import load_study

    files = _files(tmp_path, rows)
    spec = yaml.safe_load(write_study(tiny_models, (files["train_file"], files["eval_file"]), tmp_path, metric=metric,
                                      seeds=1,
                                      grid={"method.kind": ["lora", "full"]}).read_text())
    spec["config"]["data"] |= {"task": task, "label_separator": ";"}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    study = load_study(path)
    assert run_study(study, progress=False) == {}
    markdown = (write_report([study.directory]) / "report.md").read_text()
    quality = markdown.split("### Quality")[1].split("###")[0]
    assert plots_name(metric) in quality and "accuracy" not in quality.split("\n")[2]
    assert ("Per class" in markdown) == (task == "multi_label") and "confusion" not in markdown.lower()


def plots_name(metric: str) -> str:
    from peftlab.studies.plots import metric_name

    return metric_name(metric)


def pair_rows(n: int, seed: int) -> pd.DataFrame:
    """Label: whether the second text holds the first text's sentiment word (a pair task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first = rng.choice(POSITIVE + NEGATIVE)
        same = rng.random() < 0.5
        pool = (POSITIVE if first in POSITIVE else NEGATIVE) if same else (NEGATIVE if first in POSITIVE else POSITIVE)
        second = " ".join([rng.choice(FILLER), rng.choice(pool), rng.choice(FILLER)])
        rows.append({"premise": f"{rng.choice(FILLER)} {first}", "hypothesis": second,
                     "label": "same" if same else "opposite"})
    return pd.DataFrame(rows)


def test_a_pair_run_predicts_on_pairs_as_it_was_evaluated(make_config, tmp_path):
    from peftlab.serving.predict import predict_file

    files = {}
    for name, frame in (("train", pair_rows(240, 1)), ("eval", pair_rows(80, 2))):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        files[f"{name}_file"] = str(tmp_path / f"{name}.csv")
    config = make_config("bert", data={**files, "text_column": "premise", "text_pair_column": "hypothesis"},
                         train={"epochs": 2})
    run = load_run(train(config))
    out = tmp_path / "predictions.jsonl"
    rows = predict_file(run.path, files["eval_file"], out, text_column="premise", pair_column="hypothesis",
                        show_progress=False)
    predicted = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    truth = pd.read_csv(files["eval_file"])["label"].tolist()
    accuracy = np.mean([p == t for p, t in zip(predicted, truth)])
    assert rows == 80 and accuracy == pytest.approx(run.summary["final"]["accuracy"], abs=1.5 / 80)
    with pytest.raises(DataError, match="trained on text pairs .*--text-pair-column"):
        predict_file(run.path, files["eval_file"], tmp_path / "single.jsonl", text_column="premise",
                     show_progress=False)
    assert not (tmp_path / "single.jsonl").exists()
    # Served as text-embeddings-inference takes pairs, with the token types the tokenizer gives a pair.
    frame = pd.read_csv(files["eval_file"]).head(4)
    expected = Classifier.from_run(run.path, device="cpu").probabilities(frame.premise.tolist(),
                                                                           pairs=frame.hypothesis.tolist())
    with Server(ServedModel.from_model(run.path, device="cpu")) as server:
        status, served = status_and_json(server.url, "/predict",
                                         {"inputs": [[a, b] for a, b in zip(frame.premise, frame.hypothesis)]})
        one_status, one = status_and_json(server.url, "/predict", {"inputs": [frame.premise[0], frame.hypothesis[0]]})
        single_status, refused = status_and_json(server.url, "/predict", {"inputs": "one text alone"})
    assert status == 200 and one_status == 200 and one == served[0]
    for answer, probabilities in zip(served, expected):
        assert {a["label"]: a["score"] for a in answer} == pytest.approx(dict(zip(run.labels, probabilities)), abs=1e-5)
    assert single_status == 422 and "trained on text pairs" in refused["error"]


def test_thresholds_are_tuned_per_label_or_globally_to_maximise_f1():
    from peftlab.tasks import tuned_thresholds

    labels = np.array([[1, 1], [1, 0], [0, 1], [0, 0]] * 5)
    probabilities = np.array([[0.35, 0.8], [0.32, 0.6], [0.1, 0.9], [0.2, 0.65]] * 5)  # label 0 positive above 0.3,
    assert tuned_thresholds(labels, probabilities, "fixed").tolist() == [0.5, 0.5]      # label 1 above 0.7
    assert tuned_thresholds(labels, probabilities, "per_label").tolist() == [0.3, 0.7]  # ties: nearest 0.5
    (single, again) = tuned_thresholds(labels, probabilities, "global").tolist()
    assert single == again and 0.05 <= single <= 0.95


def test_tuned_thresholds_are_kept_with_the_best_evaluation_and_used_by_predict(make_config, tmp_path):
    kind, lr = LEARNABLE["full"]
    config = make_config("bert", method=kind, data={**_files(tmp_path, multi_label_rows), "task": "multi_label",
                                                     "label_separator": ";", "thresholds": "per_label"},
                         train={"epochs": 4, "lr": lr, "warmup_ratio": 0.1})
    run = load_run(train(config))
    thresholds = run.summary["best"]["thresholds"]
    assert len(thresholds) == 2 and all(0.05 <= t <= 0.95 for t in thresholds)
    texts = ["w1 good w2 bad", "w3 w4", "lovely w5", "awful w6"]
    raw = Classifier.from_run(run.path, device="cpu", raw=True)
    assert raw.thresholds == thresholds
    raw_answers = raw.label_rows(raw.probabilities(texts))
    for answer, row in zip(raw_answers, raw.probabilities(texts)):
        assert answer["labels"] == [n for n, p, t in zip(raw.labels, row, thresholds) if p >= t]
    # Calibrated (a temperature per label), the thresholds move with the probabilities: the same labels.
    classifier = Classifier.from_run(run.path, device="cpu")
    temperature = run.summary["best"]["temperature"]
    assert len(temperature) == 2 and classifier.thresholds == calibrated_thresholds(thresholds, temperature)
    values = classifier.probabilities(texts)
    assert [a["labels"] for a in classifier.label_rows(values)] == [a["labels"] for a in raw_answers]
    thresholds = classifier.thresholds
    # The export keeps them in config.json, and serving the export marks labels by them.
    from peftlab.serving.export import export_run

    out = export_run(run.path, tmp_path / "export")
    exported = json.loads((out / "config.json").read_text())
    assert exported["decision_thresholds"] == dict(zip(run.labels, thresholds))
    assert exported["problem_type"] == "multi_label_classification" and "decision_thresholds" in (
        out / "README.md").read_text()
    with Server(ServedModel.from_model(out, device="cpu")) as server:
        status, served = status_and_json(server.url, "/predict", {"inputs": ["w1 good w2 bad", "w3 w4"]})
    assert status == 200
    for answer, row in zip(served, values):
        marked = {a["label"] for a in answer if a.get("predicted")}
        assert marked == {n for n, p, t in zip(classifier.labels, row, thresholds) if p >= t}
