"""The speed plan: every path decided once, `speed: off` the reference path, the same results."""

from __future__ import annotations

import pytest
import torch
from test_cuda_graphs import _dropout_free_model, _evals
from test_train import LEARNABLE

from peftlab.config import SPEED_SWITCHES, SpeedConfig
from peftlab.errors import TrainingSetupError
from peftlab.runs import load_run
from peftlab.serving.inference import Classifier
from peftlab.speed.plan import Setting, inference_plan, resolve
from peftlab.training.run import train

CPU_PATHS = {"fast_dropout", "first_token_last_layer", "packed_tokens", "evaluation_packing", "folded_clipping",
             "process_settings"}


def test_the_default_plan_on_a_cpu_takes_the_verified_paths_and_says_why_not_the_others():
    plan = resolve(SpeedConfig(), Setting(model_type="bert", method="lora", group_by_length=False))
    assert set(plan.taken()) == CPU_PATHS
    assert set(plan.off) == set(SPEED_SWITCHES) - CPU_PATHS and all(plan.off.values())
    assert plan.off["cuda_graphs"] == "it needs a CUDA GPU"
    deberta = resolve(SpeedConfig(), Setting(model_type="deberta-v2", group_by_length=False))
    assert not deberta.first_token_last_layer and "first-token head" in deberta.off["first_token_last_layer"]
    assert not deberta.packed_tokens and "SDPA attention" in deberta.off["packed_tokens"]


def test_every_path_set_to_true_that_cannot_run_is_named_in_one_error_before_any_work(make_config, tmp_path):
    config = make_config("deberta-v2", speed={"cuda_graphs": True, "unpadded_attention": True,
                                              "first_token_last_layer": True, "seen_embedding_rows": True})
    with pytest.raises(TrainingSetupError) as refused:
        train(config)
    lines = str(refused.value).splitlines()
    assert lines[0] == "4 speed setting(s) cannot run here:"
    assert any(line.strip().startswith("speed.first_token_last_layer=true: model type 'deberta-v2'") for line in lines)
    assert not (tmp_path / "runs").exists()


def test_speed_off_trains_and_evaluates_as_the_default_plan(make_config, tiny_models, tmp_path):
    """Without dropout the CPU paths compute the same function up to summation order and rounding, so
    the plain reference path and the default plan evaluate alike: to 1e-4 while the loss is flat,
    within 2e-2 once a high learning rate has amplified the rounding (each path alone moves the later
    losses by as much), and both learn the task."""
    model = _dropout_free_model(tiny_models, "bert", tmp_path / "model")
    kind, lr = LEARNABLE["lora"]
    runs = {}
    for planned in (False, True):
        config = make_config("bert", model={"name": str(model), "max_length": 32}, method=kind,
                             train={"epochs": 10, "lr": lr, "warmup_ratio": 0.1, "group_by_length": False},
                             speed={} if planned else {"all": False}, output={"name": f"planned-{planned}"})
        runs[planned] = train(config)
    reference, planned = (load_run(runs[key]).summary for key in (False, True))
    assert not any(reference[name] for name in SPEED_SWITCHES)
    assert all(planned[name] for name in CPU_PATHS) and planned["speed_paths_off"]["cuda_graphs"]
    reference_evals, planned_evals = _evals(runs[False]), _evals(runs[True])
    assert len(reference_evals) == len(planned_evals) == 10
    for index, (a, b) in enumerate(zip(reference_evals, planned_evals)):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-4 if index < 4 else 2e-2), index
    assert min(reference_evals[-1]["accuracy"], planned_evals[-1]["accuracy"]) >= 0.8
    assert planned_evals[-1]["accuracy"] == pytest.approx(reference_evals[-1]["accuracy"], abs=0.05)


def test_predict_follows_the_runs_plan(make_config):
    run = train(make_config("bert", train={"epochs": 1}, speed={"evaluation_packing": False}))
    classifier = Classifier.from_run(run, device="cpu")
    assert not classifier.plan.evaluation_packing and classifier.plan.off["evaluation_packing"]
    assert inference_plan(SpeedConfig(), "cpu", "bert").evaluation_packing
    with torch.inference_mode():
        probabilities = classifier.probabilities(["good movie", "bad bad film", "fine"])
    assert probabilities.shape == (3, len(classifier.labels))
