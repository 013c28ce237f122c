"""Every method on every architecture: what trains, what stays frozen, save -> load -> same predictions."""

import pytest
import torch
from conftest import ARCHS

from peftlab.config_loading import validate_config
from peftlab.methods import (
    MethodError,
    apply_method,
    count_parameters,
    head_modules,
    load_trained,
    parameter_groups,
    resolve_targets,
    save_trained,
)
from peftlab.models import load_classifier

LABELS = {0: "neg", 1: "pos"}
METHODS = {
    "full": {"kind": "full"},
    "head": {"kind": "head"},
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "targets": "attention"},
    "lora-all-linear-rslora": {"kind": "lora", "r": 2, "rslora": True, "bias": "lora_only", "targets": "all-linear"},
    "dora": {"kind": "dora", "r": 4, "targets": "attention"},
    "loraplus": {"kind": "loraplus", "r": 4, "lr_ratio": 8, "targets": "attention"},
    "gaussian-init": {"kind": "lora", "r": 4, "init": "gaussian", "targets": "feedforward"},
    "ia3": {"kind": "ia3"},
    "loha": {"kind": "peft", "config": "LoHaConfig", "options": {"r": 2, "target_modules": "attention"}},
    "vera": {"kind": "peft", "config": "VeraConfig", "options": {"r": 4, "target_modules": "all-linear"}},
}


def method_of(spec):
    return validate_config({"data": {"source": "tweets"}, "method": spec}).method


def fresh(tiny_models, arch):
    torch.manual_seed(0)
    return load_classifier(str(tiny_models[arch]), LABELS)


def one_step(model, method, lr=1e-2):
    """One optimizer step on a fixed batch with non-zero gradients everywhere."""
    torch.manual_seed(1)
    inputs = {"input_ids": torch.randint(5, 50, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    optimizer = torch.optim.AdamW(parameter_groups(model, method, lr, 0.0))
    model.train()
    model(**inputs, labels=torch.tensor([0, 1] * 4)).loss.backward()
    optimizer.step()
    model.eval()
    return inputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_method_trains_what_it_should_and_round_trips(tiny_models, tmp_path, arch, name):
    if name == "vera" and arch == "distilbert":
        pytest.skip("VeRA needs all targeted layers to share one shape; DistilBERT's FFN layers do not")
    method = method_of(METHODS[name])
    model = apply_method(fresh(tiny_models, arch), method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    counts = count_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert counts["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert 0 < counts["trainable_share"] <= 1
    heads = head_modules(model.get_base_model() if hasattr(model, "get_base_model") else model)
    assert any(h in n for n in trainable for h in heads), "the classification head must train"
    if name != "full":
        assert counts["trainable_share"] < 0.5

    inputs = one_step(model, method)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        if n not in trainable:
            assert not changed, f"frozen {n} changed"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in trainable)

    with torch.no_grad():
        expected = model(**inputs).logits
    save_trained(model, method, tmp_path / "saved")
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    if name == "full":
        assert "model.safetensors" in files
    elif name == "head":
        assert "head_model.safetensors" in files
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    reloaded = load_trained(tmp_path / "saved", method, lambda: fresh(tiny_models, arch)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, attention, feedforward", [
    ("distilbert", {"q_lin", "k_lin", "v_lin", "out_lin"}, {"lin1", "lin2"}),
    ("bert", {"query", "key", "value", "attention.output.dense"}, {"intermediate.dense", "layer.0.output.dense"}),
    ("deberta-v2", {"query_proj", "key_proj", "value_proj", "attention.output.dense"}, {"intermediate.dense"}),
])
def test_targets_resolve_per_architecture(tiny_models, arch, attention, feedforward):
    model = fresh(tiny_models, arch)
    att, ffn, every = (resolve_targets(model, t) for t in ("attention", "feedforward", "all-linear"))
    assert len(att) == 2 * 4 and len(ffn) == 2 * 2  # two layers
    assert all(any(n.endswith(s) for n in att) for s in attention)
    assert all(any(s in n for n in ffn) for s in feedforward)
    assert set(att) | set(ffn) <= set(every) and not set(att) & set(ffn)
    if arch != "deberta-v2":  # DeBERTa also has relative-position projections
        assert set(att) | set(ffn) == set(every)
    assert not any(h in n for n in every for h in head_modules(model))


def test_unknown_target_names_what_exists(tiny_models):
    with pytest.raises(MethodError, match=r"\['q_proj'\] match no linear layer.*query"):
        resolve_targets(fresh(tiny_models, "bert"), ["q_proj"])


def test_lora_parameter_count_is_exact(tiny_models):
    model = apply_method(fresh(tiny_models, "bert"), method_of(METHODS["lora"]))
    # 2 layers x 4 attention projections x r(32 + 32); plus the head (classifier 32*2 + 2).
    assert count_parameters(model)["trainable_params"] == 2 * 4 * 4 * 64 + 66


def test_loraplus_boosts_only_the_b_matrices(tiny_models):
    method = method_of(METHODS["loraplus"])
    model = apply_method(fresh(tiny_models, "distilbert"), method)
    groups = {g["name"]: g for g in parameter_groups(model, method, lr=1e-3, weight_decay=0.01)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["lora_B"]["lr"] == pytest.approx(8e-3)
    assert all("lora_B" in names[id(p)] for p in groups["lora_B"]["params"])
    assert {g["lr"] for k, g in groups.items() if k != "lora_B"} == {1e-3}
    assert groups["no_decay"]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups["no_decay"]["params"])
    assert any("classifier" in names[id(p)] and names[id(p)].endswith("bias") for p in groups["no_decay"]["params"])
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_head_learns_at_its_own_rate(tiny_models, arch, kind):
    method = method_of(METHODS[kind])
    model = apply_method(fresh(tiny_models, arch), method)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in parameter_groups(model, method, lr=1e-4, weight_decay=0.01, head_lr=3e-3)}
    head = {names[id(p)] for p in groups["head"]["params"]}
    in_head = {n for n, p in model.named_parameters() if p.requires_grad and ("classifier" in n or "pre_classifier" in n)}
    assert head == in_head and groups["head"]["lr"] == 3e-3
    assert all(g["lr"] == 1e-4 for k, g in groups.items() if k != "head")
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in model.parameters() if p.requires_grad)
    assert "head" not in {g["name"] for g in parameter_groups(model, method, lr=1e-4, weight_decay=0.01)}


def test_head_lr_defaults_to_lr_but_multi_label_heads_learn_faster():
    single = validate_config({"data": {"source": "tweets"}, "method": {"kind": "full"}})
    multi = validate_config({"data": {"source": "attack-tactics", "task": "multi_label"}, "method": {"kind": "full"}})
    assert single.head_learning_rate() == single.train.lr == 5e-5 and multi.head_learning_rate() == 3e-3
    ia3 = validate_config({"data": {"source": "attack-tactics", "task": "multi_label"}, "method": {"kind": "ia3"}})
    assert ia3.head_learning_rate() == ia3.train.lr == 1e-2  # never slower than the rest
    chosen = validate_config({"data": {"source": "tweets"}, "train": {"head_lr": 1e-3}})
    assert chosen.head_learning_rate() == 1e-3


def test_pickle_only_model_is_refused(tiny_models, tmp_path):
    model = fresh(tiny_models, "bert")
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    from peftlab.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="no safetensors weights.*model.allow_pickle=true"):
        load_classifier(str(tmp_path / "bin"), LABELS)
    assert load_classifier(str(tmp_path / "bin"), LABELS, allow_pickle=True) is not None


def test_model_that_needs_remote_code_is_refused_and_its_code_never_runs(tiny_models, tmp_path):
    import json
    import shutil

    from peftlab.models import ModelLoadError

    custom = tmp_path / "custom"
    shutil.copytree(tiny_models["bert"], custom)
    config = json.loads((custom / "config.json").read_text())
    config |= {"model_type": "custom-encoder",
               "auto_map": {"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModelForSequenceClassification": "modeling_custom.CustomModel"}}
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (custom / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError, match="needs remote code, which peftlab does not run"):
        load_classifier(str(custom), LABELS)
    assert not marker.exists()
