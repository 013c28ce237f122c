"""Inference and training on real tokens only (packed_tokens.py): the same logits, loss and gradients
as the padded batch, with the encoder's layers seeing no padding; after inference the model as it was."""

from __future__ import annotations

import json

import pytest
import torch

from peftlab.errors import TrainingSetupError
from peftlab.method_configs import LoraMethod
from peftlab.methods import apply_method
from peftlab.models import load_classifier
from peftlab.speed.attention import encoder_layers
from peftlab.speed.fast_dropout import use_fast_dropout
from peftlab.speed.first_token import compute_first_token_only, is_first_token_only
from peftlab.speed.packed_tokens import ATTENTION, pack_tokens_to_train, packed_tokens
from peftlab.training.run import train

LABELS = {0: "neg", 1: "pos", 2: "mixed"}


def _padded_batch():
    torch.manual_seed(1)
    lengths = [12, 3, 9, 12, 1, 7]  # a full row, one of a single token, the rest between
    mask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(5, 50, (6, 12)) * mask, "attention_mask": mask}, sum(lengths)


def _model(tiny_models, arch: str, variant: str):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_models[arch]), LABELS)
    if variant == "lora":
        model = apply_method(model, LoraMethod(kind="lora", r=4, alpha=8, targets="all-linear"))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # trained adapters are not zero
                torch.nn.init.normal_(parameter, std=0.1)
    if variant == "fast-dropout":
        use_fast_dropout(model)
    return model.eval()


@pytest.mark.parametrize("arch,variant", [("bert", "plain"), ("distilbert", "plain"), ("roberta", "plain"),
                                          ("bert", "lora"), ("distilbert", "fast-dropout")])
def test_packed_tokens_give_the_padded_batchs_logits_without_padding_in_the_layers(tiny_models, arch, variant):
    model = _model(tiny_models, arch, variant)
    inputs, real_tokens = _padded_batch()
    encoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = encoder_layers(encoder)
    attention = encoder.config._attn_implementation
    seen = []
    for layer in (layers[0], layers[-1]):
        layer.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))
    with torch.inference_mode():
        expected = model(**inputs).logits
        with packed_tokens(model) as packed:
            assert packed
            got = model(**inputs).logits
    width = encoder.config.hidden_size if arch != "distilbert" else encoder.config.dim
    assert seen[:2] == [(6, 12, width)] * 2
    assert seen[2] == (1, real_tokens, width)  # the first layer: real tokens only
    assert seen[3] == (6, 1, width)  # the last: the padded rows' keys and values, the first token's output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # afterwards: the same attention, no hooks of ours, every token computed, the same logits
    assert encoder.config._attn_implementation == attention
    assert not layers[0]._forward_pre_hooks and not layers[-1]._forward_pre_hooks
    assert len(layers[0]._forward_hooks) == len(layers[-1]._forward_hooks) == 1
    assert not is_first_token_only(layers[-1])
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


def test_packed_tokens_under_bf16_autocast_agree_with_the_padded_batch(tiny_models):
    model = _model(tiny_models, "bert", "lora")
    inputs, _ = _padded_batch()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**inputs).logits.float()
        with packed_tokens(model):
            got = model(**inputs).logits.float()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)  # bf16 products, another summation order


def test_without_padding_or_with_another_attention_nothing_is_packed(tiny_models):
    model = _model(tiny_models, "bert", "plain")
    inputs, _ = _padded_batch()
    ids = inputs["input_ids"].clamp(min=5)
    seen = []
    encoder_layers(model)[-1].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        with packed_tokens(model) as packed:
            assert packed
            for full_rows in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
                torch.testing.assert_close(model(**full_rows).logits, expected, rtol=1e-5, atol=1e-5)
    assert seen == [(6, 12, 32)] * 3  # no mask, or one without padding: the batch as it came
    deberta = _model(tiny_models, "deberta-v2", "plain")  # relative positions: its own attention
    with packed_tokens(deberta) as packed:
        assert not packed


def _without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("arch,variant,first_token", [("bert", "plain", False), ("bert", "plain", True),
                                                      ("distilbert", "plain", True), ("roberta", "lora", True)])
def test_training_on_real_tokens_gives_the_padded_batchs_loss_and_gradients(tiny_models, arch, variant, first_token):
    """pack_tokens_to_train: the layers train on real tokens only, through fast dropout's attention;
    with nothing dropped the loss and every gradient are the padded batch's."""
    inputs, real_tokens = _padded_batch()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    results = []
    for packed in (False, True):
        model = _model(tiny_models, arch, variant)
        use_fast_dropout(model)
        if first_token:
            compute_first_token_only(model)
        if packed:
            assert pack_tokens_to_train(model)
        encoder = model.get_base_model() if hasattr(model, "get_base_model") else model
        seen = []
        encoder_layers(encoder)[0].register_forward_hook(lambda module, args, output: seen.append(output.shape[:2]))
        _without_dropout(model).train()
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        results.append((loss.detach(), grads))
        assert seen == [(1, real_tokens) if packed else (6, 12)]
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_packed_to_train_evaluates_packed_and_stays_packed(tiny_models):
    model = _model(tiny_models, "bert", "plain")
    use_fast_dropout(model)
    assert pack_tokens_to_train(model)
    inputs, real_tokens = _padded_batch()
    layers = encoder_layers(model)
    seen = []
    layers[0].register_forward_hook(lambda module, args, output: seen.append(output.shape[:2]))
    hooks = (len(layers[0]._forward_pre_hooks), len(layers[-1]._forward_pre_hooks), len(layers[-1]._forward_hooks))
    with torch.inference_mode(), packed_tokens(model.eval()) as packed:
        assert packed and is_first_token_only(layers[-1])
        model(**inputs)
    assert seen == [(1, real_tokens)]
    assert model.config._attn_implementation == ATTENTION and not is_first_token_only(layers[-1])
    assert (len(layers[0]._forward_pre_hooks), len(layers[-1]._forward_pre_hooks),
            len(layers[-1]._forward_hooks)) == hooks


def test_only_fast_dropouts_attention_is_packed_to_train(tiny_models):
    assert not pack_tokens_to_train(_model(tiny_models, "bert", "plain"))  # SDPA: training would drop inside it
    assert not pack_tokens_to_train(_model(tiny_models, "deberta-v2", "fast-dropout"))  # its own attention


@pytest.mark.parametrize("settings,speed,packed", [({}, {}, False), ({"group_by_length": False}, {}, True),
                                                   ({"group_by_length": False}, {"packed_tokens": False}, False),
                                                   ({}, {"packed_tokens": True}, True),
                                                   ({"group_by_length": False}, {"fast_dropout": False}, False)])
def test_cpu_training_packs_the_real_tokens_of_random_batches(make_config, settings, speed, packed):
    config = make_config(method={"kind": "full"}, train={"epochs": 10, "lr": 2e-3, "warmup_ratio": 0.1, **settings},
                         speed=speed)
    summary = json.loads((train(config) / "summary.json").read_text())
    assert summary["packed_tokens"] is packed
    assert summary["best"]["accuracy"] >= 0.7  # the toy task is learnt either way


def test_packed_training_needs_fast_dropout(make_config):
    with pytest.raises(TrainingSetupError, match="speed.packed_tokens=true: it trains through fast dropout's attention"):
        train(make_config(speed={"packed_tokens": True, "fast_dropout": False}))
