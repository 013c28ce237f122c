from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.config_loading import load_config, parse_overrides, validate_config
from peftlab.errors import ConfigError
from peftlab.method_configs import LoraPlusMethod

ROOT = Path(__file__).resolve().parents[1]
BASE = {"data": {"source": "tweets"}}


def test_overrides_parse_values_as_yaml():
    assert parse_overrides(["method.r=16", "train.lr=2e-4", "method.targets=[query, value]", "data.n_train="]) == {
        "method.r": 16, "train.lr": 2e-4, "method.targets": ["query", "value"], "data.n_train": None}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["method.r"])


def test_overrides_apply_and_validate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: tweets}\nmethod: {kind: loraplus}\n")
    config = load_config(path, ["method.r=16", "method.lr_ratio=4", "train.epochs=5"])
    assert isinstance(config.method, LoraPlusMethod)
    assert (config.method.r, config.method.lr_ratio, config.train.epochs) == (16, 4.0, 5)


def test_every_problem_is_reported_at_once_with_the_key():
    raw = {**BASE, "method": {"kind": "lora", "rr": 3, "dropout": 2}, "train": {"lr": "fast"}, "typo": 1}
    with pytest.raises(ConfigError) as err:
        validate_config(raw, origin="x.yaml")
    text = str(err.value)
    assert text.startswith("x.yaml: 4 problem(s)")
    assert "method.rr: unknown key (allowed here: alpha, bias" in text
    assert "method.dropout: Input should be less than 1" in text
    assert "train.lr: Input should be a valid number" in text and "'fast'" in text
    assert "typo: unknown key (allowed here: data, method, model, output, speed, train)" in text


def test_keys_of_another_method_are_rejected():
    with pytest.raises(ConfigError, match="method.r: unknown key"):
        validate_config({**BASE, "method": {"kind": "full", "r": 8}})
    with pytest.raises(ConfigError, match="unknown method kind 'lorax'"):
        validate_config({**BASE, "method": {"kind": "lorax"}})


def test_contradictions_are_rejected():
    with pytest.raises(ConfigError, match="warmup_steps or train.warmup_ratio, not both"):
        validate_config({**BASE, "train": {"warmup_steps": 10, "warmup_ratio": 0.1}})
    with pytest.raises(ConfigError, match="either data.source or data.train_file"):
        validate_config({"data": {"source": "imdb", "train_file": "a.csv"}})
    with pytest.raises(ConfigError, match="give data.source"):
        validate_config({"data": {}})
    with pytest.raises(ConfigError, match="train.best_metric"):
        validate_config({**BASE, "train": {"best_metric": "auc"}})


def test_peft_method_options_are_checked_against_the_peft_class():
    config = validate_config({**BASE, "method": {"kind": "peft", "config": "LoHaConfig", "options": {"r": 4}}})
    assert config.method.config == "LoHaConfig"
    with pytest.raises(ConfigError, match=r"\['rank'\] are not fields of LoHaConfig"):
        validate_config({**BASE, "method": {"kind": "peft", "config": "loha", "options": {"rank": 4}}})
    with pytest.raises(ConfigError, match="peft has no config 'NopeConfig'"):
        validate_config({**BASE, "method": {"kind": "peft", "config": "NopeConfig"}})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_print_config_prints_the_resolved_config(capsys):
    assert main(["train", str(ROOT / "configs" / "tweets-lora.yaml"), "--print-config", "method.r=4"]) == 0
    out = capsys.readouterr().out
    assert "  r: 4\n" in out and "max_grad_norm: 1.0" in out


def test_cli_reports_config_errors_without_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: tweets}\ntrain: {epochs: zero}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: 1 problem(s)" in err and "train.epochs" in err and "Traceback" not in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_differences_ignore_keys_added_since_with_their_defaults(make_config):
    import json

    from peftlab.config_loading import config_differences

    current = make_config("bert").model_dump(mode="json")
    older = json.loads(json.dumps(current))
    del older["train"]["keep_checkpoints"]  # written before the key existed
    assert config_differences(older, current) == []
    older["train"]["lr"] = 0.1
    assert config_differences(older, current) == ["train.lr: 0.1 there, 0.005 here"]


@pytest.mark.parametrize("kind, rate", [("full", 5e-5), ("lora", 2e-3), ("loraplus", 5e-4), ("ia3", 1e-2)])
def test_each_method_gets_its_own_learning_rate_unless_one_is_given(kind, rate):
    data = {"source": "tweets"}
    assert validate_config({"data": data, "method": {"kind": kind}}).train.lr == rate
    assert validate_config({"data": data, "method": {"kind": kind}, "train": {"lr": 0.1}}).train.lr == 0.1
    config = validate_config({"data": data})
    assert (config.method.kind, config.method.targets, config.method.r, config.train.lr) == ("lora", "attention", 8, 2e-3)
    assert config.train.warmup_ratio == 0.06
    stepped = validate_config({"data": data, "train": {"warmup_steps": 10}}).train
    assert (stepped.warmup_steps, stepped.warmup_ratio) == (10, None)


def test_an_old_train_speed_key_names_its_new_place():
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, "train": {"fast_dropout": False, "cuda_graphs": True, "epochs": 2}})
    text = str(err.value)
    assert "train.fast_dropout: moved to speed.fast_dropout" in text
    assert "train.cuda_graphs: moved to speed.cuda_graphs" in text and "2 problem(s)" in text


@pytest.mark.parametrize("written", ["off", False, {"all": False}])
def test_speed_off_turns_every_path_off(written):
    from peftlab.config import SPEED_SWITCHES
    from peftlab.speed.plan import Setting, resolve

    speed = validate_config({**BASE, "speed": written}).speed
    assert speed.all is False
    plan = resolve(speed, Setting(model_type="bert"))
    assert plan.taken() == [] and set(plan.off) == set(SPEED_SWITCHES)
    assert plan.describe() == "speed paths: none (the reference path)"


def test_a_path_forced_on_beside_speed_off_is_refused():
    with pytest.raises(ConfigError, match="speed.all=false turns every path off; drop speed.fast_dropout"):
        validate_config({**BASE, "speed": {"all": False, "fast_dropout": True}})


def test_a_run_config_saved_with_the_old_train_keys_still_loads():
    from peftlab.config_loading import config_differences, migrate_saved

    saved = {**BASE, "train": {"epochs": 2, "fast_dropout": False, "compile": False}}
    config = validate_config(migrate_saved(saved))
    assert config.speed.fast_dropout is False and config.train.epochs == 2
    assert config_differences(saved, config.model_dump(mode="json")) == []
