"""`peftlab tune`: Optuna trials as ordinary runs, pruning on the per-epoch metric, going on later."""

import json

import pytest
import yaml

from peftlab.cli import main
from peftlab.errors import StudyError
from peftlab.runs import is_finished, load_run
from peftlab.studies.tune import load_tune

pytest.importorskip("optuna")


def write_tune(tiny_models, toy_files, root, train: dict | None = None, **spec):
    """A tune file over the tiny BERT and the toy task; `train` changes the base config's train section."""
    path = root / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy-tune",
        "config": {
            "model": {"name": str(tiny_models["bert"]), "max_length": 32},
            "data": {"train_file": str(toy_files[0]), "eval_file": str(toy_files[1])},
            "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"},
            "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, **(train or {})},
            "output": {"dir": str(root / "runs"), "progress": False, "cache_dir": str(root / "cache")},
        },
        **spec,
    }))
    return path


def trials_of(root):
    return json.loads((root / "runs" / "toy-tune" / "tune.json").read_text())


def test_trials_are_ordinary_runs_and_a_second_call_goes_on_to_the_new_total(tiny_models, toy_files, tmp_path):
    path = write_tune(tiny_models, toy_files, tmp_path, trials=3, pruner="none",
                      space={"train.lr": {"low": 1e-3, "high": 3e-2, "log": True}, "method.r": [2, 4]})
    assert main(["tune", str(path)]) == 0
    record = trials_of(tmp_path)
    assert [t["state"] for t in record["trials"]] == ["COMPLETE"] * 3
    for trial in record["trials"]:
        assert trial["finished"]
        config = load_run(tmp_path / "runs" / "toy-tune" / trial["run"]).config
        assert config.train.lr == pytest.approx(trial["params"]["train.lr"])
        assert config.method.r == trial["params"]["method.r"]
    assert record["best"]["value"] == max(t["value"] for t in record["trials"])

    assert main(["tune", str(path), "trials=5"]) == 0  # the same storage: two more trials, not five
    record = trials_of(tmp_path)
    assert [t["number"] for t in record["trials"]] == [0, 1, 2, 3, 4]
    assert main(["report", str(tmp_path / "runs" / "toy-tune" / "trial-0000"),
                 str(tmp_path / "runs" / "toy-tune" / "trial-0004"), "--out", str(tmp_path / "report")]) == 0


def test_the_pruner_ends_a_hopeless_trial_after_its_first_epoch_as_a_finished_run(tiny_models, toy_files, tmp_path):
    path = write_tune(tiny_models, toy_files, tmp_path, trials=2, metric="eval_loss",
                      space={"train.lr": [1e-4, 50.0]}, enqueue=[{"train.lr": 1e-4}, {"train.lr": 50.0}])
    assert main(["tune", str(path), "train.epochs=4"]) == 0  # lr 50 blows the loss up: pruned
    first, second = trials_of(tmp_path)["trials"]
    assert (first["state"], second["state"]) == ("COMPLETE", "PRUNED")
    runs = tmp_path / "runs" / "toy-tune"
    assert load_run(runs / first["run"]).summary["epochs_run"] == 4
    pruned = load_run(runs / second["run"]).summary
    assert is_finished(runs / second["run"]) and pruned["pruned"] and pruned["epochs_run"] == 1


def test_a_bad_space_fails_before_any_trial(tiny_models, toy_files, tmp_path):
    for space, message in [({"method.r": [4, 0]}, "space.method.r = 0"),
                           ({"train.nope": [1]}, "space.train.nope"),
                           ({"train.lr": []}, "no values")]:
        with pytest.raises(StudyError, match=message):
            load_tune(write_tune(tiny_models, toy_files, tmp_path, space=space))
    assert not (tmp_path / "runs").exists()
