"""The last layer for the first token only (first_token.py): the same logits and gradients as the full
layer, the model's weights and other layers untouched, and training that uses it by default on a CPU."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peftlab.errors import TrainingSetupError
from peftlab.method_configs import LoraMethod
from peftlab.methods import apply_method
from peftlab.models import load_classifier
from peftlab.speed.fast_dropout import use_fast_dropout
from peftlab.speed.first_token import (
    compute_every_token,
    compute_first_token_only,
    first_token_only,
    is_first_token_only,
    last_layer,
)
from peftlab.training.run import train

LABELS = {0: "neg", 1: "pos", 2: "mixed"}


def _batch():
    torch.manual_seed(1)
    lengths = [12, 3, 9, 12, 1, 7]
    mask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(5, 50, (6, 12)) * mask, "attention_mask": mask,
            "labels": torch.tensor([0, 1, 2, 1, 0, 2])}


def _model(tiny_models, arch: str, lora: bool = False):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_models[arch]), LABELS)
    if lora:
        model = apply_method(model, LoraMethod(kind="lora", r=4, alpha=8, targets="all-linear", dropout=0.0))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    for module in model.modules():  # no dropout: both passes must draw nothing
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _loss_and_gradients(model, inputs):
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return output.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,lora,attention", [("bert", False, "sdpa"), ("roberta", False, "sdpa"),
                                                 ("distilbert", False, "sdpa"), ("bert", True, "sdpa"),
                                                 ("bert", False, "eager"), ("distilbert", False, "fast-dropout")])
def test_the_first_token_only_gives_the_logits_and_gradients_of_every_token(tiny_models, arch, lora, attention):
    model = _model(tiny_models, arch, lora).train()
    if attention == "fast-dropout":
        use_fast_dropout(model)  # its own explicit attention, with dropout 0 here
    elif attention == "eager":
        model.set_attn_implementation("eager")
    inputs = _batch()
    logits, gradients = _loss_and_gradients(model, inputs)
    state_keys = list(model.state_dict())
    assert compute_first_token_only(model)
    layer = last_layer(model)
    shapes = []
    hook = layer.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    got_logits, got_gradients = _loss_and_gradients(model, inputs)
    hook.remove()
    assert shapes == [(6, 1, shapes[0][-1])]  # the last layer's output: the first position of each row
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
    assert got_gradients.keys() == gradients.keys()  # every parameter still gets its gradient
    for name, gradient in gradients.items():
        torch.testing.assert_close(got_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    assert list(model.state_dict()) == state_keys
    compute_every_token(model)
    assert not is_first_token_only(layer)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=0)


def test_only_the_last_layer_changes_and_a_copy_computes_with_its_own_weights(tiny_models):
    model = _model(tiny_models, "bert").eval()
    inputs = _batch()
    with first_token_only(model) as done:
        assert done and is_first_token_only(model.bert.encoder.layer[-1])
        assert not is_first_token_only(model.bert.encoder.layer[0])
        copied = copy.deepcopy(model)
        with torch.no_grad():
            copied.bert.encoder.layer[-1].output.dense.weight.mul_(3.0)
            assert not torch.allclose(copied(**inputs).logits, model(**inputs).logits)
        with first_token_only(model) as again:  # nested: the outer block's state is kept
            assert again
        assert is_first_token_only(model.bert.encoder.layer[-1])
    assert not is_first_token_only(model.bert.encoder.layer[-1])


def test_encoders_whose_head_reads_more_than_the_first_token_are_left_alone(tiny_models):
    deberta = _model(tiny_models, "deberta-v2")
    with first_token_only(deberta) as done:
        assert not done
    assert last_layer(deberta) is None


def test_a_layer_given_a_cache_runs_every_token(tiny_models):
    model = _model(tiny_models, "bert").eval()
    assert compute_first_token_only(model)
    layer = last_layer(model)
    hidden = torch.randn(2, 5, 32)
    cache = object()
    called = []
    full = type(layer).forward

    def spy(self, *args, **kwargs):
        called.append(kwargs.get("cache"))
        return hidden

    type(layer).forward = spy
    try:
        assert layer(hidden, None, cache=cache).shape == (2, 5, 32)
        assert layer(hidden, None).shape == (2, 1, 32)
    finally:
        type(layer).forward = full
    assert called == [cache]


@pytest.mark.parametrize("setting", ["auto", False])
def test_cpu_training_computes_the_first_token_only_unless_told_not_to(make_config, setting):
    config = make_config(method={"kind": "full"}, train={"epochs": 10, "lr": 2e-3, "warmup_ratio": 0.1},
                         speed={"first_token_last_layer": setting})
    summary = json.loads((train(config) / "summary.json").read_text())
    assert summary["first_token_last_layer"] is (setting == "auto")
    assert summary["best"]["accuracy"] >= 0.7  # the toy task is learnt either way


def test_it_is_refused_with_compiled_blocks(make_config):
    with pytest.raises(TrainingSetupError, match="speed.first_token_last_layer=true: it is untried with speed.compile"):
        train(make_config(speed={"compile": True, "first_token_last_layer": True}))
