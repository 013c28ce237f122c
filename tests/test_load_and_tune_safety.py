"""A diverging tune trial fails alone; the storage password is never shown; trained runs load from
safetensors only (nothing unpickled unless the run's config allows it)."""

import json

import pytest
import torch
import yaml
from conftest import poison_training_forward
from test_tune import write_tune as tune_file

from peftlab.cli import main
from peftlab.config_loading import validate_config
from peftlab.errors import StudyError
from peftlab.methods import load_trained, save_trained
from peftlab.models import ModelLoadError, load_classifier

LABELS = {0: "neg", 1: "pos"}
SECRET = "s3cr3t-pw"
SECRET_URL = f"postgresql://tuner:{SECRET}@db.example.org:5432/peftlab"


# --------------------------------------------------------------------------- tune: failed trials


def write_tune(tiny_models, toy_files, root, **spec):
    """test_tune's tune file, one epoch a trial, over two learning rates."""
    return tune_file(tiny_models, toy_files, root, train={"epochs": 1, "batch_size": 32},
                     **{"pruner": "none", "space": {"train.lr": [1e-3, 5e-3]}, **spec})


def tune_record(root):
    return json.loads((root / "runs" / "toy-tune" / "tune.json").read_text())


def optuna_trials(root):
    import optuna

    storage = f"sqlite:///{(root / 'runs' / 'toy-tune' / 'optuna.db').resolve()}"
    return optuna.load_study(study_name="toy-tune", storage=storage).trials


def test_a_diverging_trial_is_recorded_failed_and_the_search_goes_on(tiny_models, toy_files, tmp_path,
                                                                     monkeypatch):
    pytest.importorskip("optuna")
    trials = {"started": 0}

    def first_trial_diverges(n):  # n counts one trial's training forwards from 1
        trials["started"] += n == 1
        return trials["started"] == 1

    poison_training_forward(monkeypatch, first_trial_diverges)
    assert main(["tune", str(write_tune(tiny_models, toy_files, tmp_path, trials=2))]) == 0
    record = tune_record(tmp_path)
    assert [t["state"] for t in record["trials"]] == ["FAIL", "COMPLETE", "COMPLETE"]
    failed = record["trials"][0]
    assert failed["error"].startswith("NonFiniteLossError: the loss became nan at step 1")
    assert not failed["finished"] and record["failures"] == {"0": failed["error"]}
    assert record["best"]["number"] in (1, 2)
    stored = optuna_trials(tmp_path)
    assert stored[0].state.name == "FAIL" and "NonFiniteLossError" in stored[0].user_attrs["error"]


def test_failing_trials_stop_after_max_failures_and_say_so(tiny_models, toy_files, tmp_path, monkeypatch, capsys):
    pytest.importorskip("optuna")
    poison_training_forward(monkeypatch, lambda n: True)  # every trial diverges: no endless search
    assert main(["tune", str(write_tune(tiny_models, toy_files, tmp_path, trials=3, max_failures=2))]) == 1
    record = tune_record(tmp_path)
    assert [t["state"] for t in record["trials"]] == ["FAIL", "FAIL"] and record["best"] is None
    assert "0/3 trials done; run the command again" in capsys.readouterr().err


def test_ctrl_c_still_stops_the_search_and_the_trial_is_recorded(tiny_models, toy_files, tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    import peftlab.training.run as train_module
    from peftlab.studies.tune import load_tune, run_tune

    calls = []

    def interrupted(config, **kwargs):
        calls.append(config.output.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tune(load_tune(write_tune(tiny_models, toy_files, tmp_path, trials=3)))
    assert calls == ["trial-0000"]
    (trial,) = tune_record(tmp_path)["trials"]
    assert trial["state"] == "FAIL" and trial["error"] == "KeyboardInterrupt"


def test_an_error_that_is_not_the_trials_own_stops_the_search(tiny_models, toy_files, tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    import peftlab.training.run as train_module
    from peftlab.data import DataError

    def broken(config, **kwargs):
        raise DataError("train.csv: no column 'label'")

    monkeypatch.setattr(train_module, "train", broken)
    assert main(["tune", str(write_tune(tiny_models, toy_files, tmp_path, trials=3))]) == 2
    (trial,) = tune_record(tmp_path)["trials"]
    assert trial["state"] == "FAIL" and "no column 'label'" in trial["error"]


# --------------------------------------------------------------------------- tune: storage secrets


def test_redact_url_hides_passwords_only():
    from peftlab.studies.tune import redact_url

    assert redact_url(SECRET_URL) == "postgresql://tuner:***@db.example.org:5432/peftlab"
    assert redact_url("mysql+pymysql://u:p@ss/w@host/db") == "mysql+pymysql://u:***@host/db"
    assert redact_url("postgresql://host/db?user=u&password=pw&sslmode=require") == \
        "postgresql://host/db?user=u&password=***&sslmode=require"
    for plain in ("sqlite:////tmp/a@b/optuna.db", "postgresql://user@db/peftlab", "sqlite:///optuna.db"):
        assert redact_url(plain) == plain


def test_the_storage_password_is_never_printed_or_saved(tiny_models, toy_files, tmp_path, monkeypatch, capsys):
    optuna = pytest.importorskip("optuna")
    real_create = optuna.create_study
    seen = []

    def create_study(*, storage, **kwargs):  # stands in for the database server
        seen.append(storage)
        return real_create(storage=f"sqlite:///{tmp_path / 'server.db'}", **kwargs)

    monkeypatch.setattr(optuna, "create_study", create_study)
    monkeypatch.setenv("PEFTLAB_TUNE_TEST_STORAGE", SECRET_URL)
    path = write_tune(tiny_models, toy_files, tmp_path, trials=1, storage="env:PEFTLAB_TUNE_TEST_STORAGE")
    assert SECRET not in path.read_text()
    assert main(["tune", str(path)]) == 0
    assert seen == [SECRET_URL]  # Optuna gets the real URL...
    out = capsys.readouterr()
    record = (tmp_path / "runs" / "toy-tune" / "tune.json").read_text()
    assert SECRET not in out.out + out.err + record  # ...nothing else shows it
    assert json.loads(record)["storage"] == "postgresql://tuner:***@db.example.org:5432/peftlab"
    assert "storage postgresql://tuner:***@db.example.org" in out.out

    assert main(["tune", str(path), f"storage={SECRET_URL}", "--dry-run"]) == 0  # given on the command line
    assert SECRET not in capsys.readouterr().out

    def unreachable(*, storage, **kwargs):
        raise ValueError(f"could not connect to {storage} (password {SECRET} rejected)")

    monkeypatch.setattr(optuna, "create_study", unreachable)
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot open the tune storage postgresql://tuner:***@" in err and SECRET not in err


def test_an_unset_storage_variable_fails_before_any_trial(tiny_models, toy_files, tmp_path, monkeypatch):
    from peftlab.studies.tune import load_tune

    monkeypatch.delenv("PEFTLAB_TUNE_TEST_UNSET", raising=False)
    with pytest.raises(StudyError, match="environment variable PEFTLAB_TUNE_TEST_UNSET is not set"):
        load_tune(write_tune(tiny_models, toy_files, tmp_path, storage="env:PEFTLAB_TUNE_TEST_UNSET"))
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- loading: safetensors only


def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)


def to_pickle(directory, safetensors_name, pickle_name):
    from safetensors.torch import load_file

    torch.save(load_file(str(directory / safetensors_name)), directory / pickle_name)
    (directory / safetensors_name).unlink()


def test_eval_loading_refuses_a_run_with_a_pickled_adapter(make_config, tmp_path, monkeypatch):
    from peftlab.serving.inference import Classifier
    from peftlab.training.reevaluate import evaluate_run
    from peftlab.training.run import train

    run = train(make_config(train={"epochs": 1}))
    model_dir = run / "model"
    expected = Classifier.from_run(run).probabilities(["good w1 w2", "bad w3"])
    to_pickle(model_dir, "adapter_model.safetensors", "adapter_model.bin")

    with monkeypatch.context() as patched:
        no_unpickling(patched)
        for load in (Classifier.from_run, evaluate_run):
            with pytest.raises(ModelLoadError, match=r"adapter_model\.bin: pickled weights; peftlab loads "
                                                     r"safetensors only.*model\.allow_pickle=true"):
                load(run)
        assert main(["eval", str(run)]) == 2

    config = yaml.safe_load((run / "config.yaml").read_text())  # the existing opt-in, in the run's config
    config["model"]["allow_pickle"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    np_close = pytest.approx(expected, abs=1e-5)
    assert Classifier.from_run(run).probabilities(["good w1 w2", "bad w3"]) == np_close


@pytest.mark.parametrize("kind, safetensors_name, pickle_name", [
    ("head", "head_model.safetensors", "head_model.bin"),
    ("full", "model.safetensors", "pytorch_model.bin"),
    ("lora", "adapter_model.safetensors", "adapter_model.bin"),
])
def test_load_trained_refuses_pickled_weights_of_every_method(tiny_models, tmp_path, monkeypatch, kind,
                                                               safetensors_name, pickle_name):
    method = validate_config({"data": {"source": "tweets"}, "method": {"kind": kind}}).method
    from peftlab.methods import apply_method

    def base():
        torch.manual_seed(0)
        return load_classifier(str(tiny_models["bert"]), LABELS)

    saved = tmp_path / "model"
    save_trained(apply_method(base(), method), method, saved)
    to_pickle(saved, safetensors_name, pickle_name)
    with monkeypatch.context() as patched:
        no_unpickling(patched)
        with pytest.raises(ModelLoadError, match=rf"{pickle_name}: pickled weights; peftlab loads safetensors only"):
            load_trained(saved, method, base)
    assert load_trained(saved, method, base, allow_pickle=True) is not None  # tensors only (weights_only)
