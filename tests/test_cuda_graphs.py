"""Training steps replayed from CUDA graphs: the same training as op by op, on a GPU only."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_train import LEARNABLE

from peftlab.batching import Collator
from peftlab.config import SpeedConfig
from peftlab.errors import TrainingSetupError
from peftlab.runs import load_run
from peftlab.speed.cuda_graphs import GraphedStep
from peftlab.speed.plan import Setting, resolve
from peftlab.tokens import Encoded
from peftlab.training.run import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_asking_for_cuda_graphs_without_a_gpu_fails_before_any_work(make_config, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = make_config(speed={"cuda_graphs": True})
    with pytest.raises(TrainingSetupError, match="speed.cuda_graphs=true: it needs a CUDA GPU"):
        train(config)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


GPU = Setting(device="cuda", precision="bf16", model_type="bert", method="lora")


@pytest.mark.parametrize("where,why", [
    (replace(GPU, device="cpu"), "it needs a CUDA GPU"),
    (replace(GPU, processes=2), "it runs in one process only"),
    (replace(GPU, sharded=True), "it runs in one process only"),
    (replace(GPU, precision="fp16"), "fp16's loss scaling"),
])
def test_graphs_are_off_where_they_cannot_run_and_refused_when_asked_for(where, why):
    assert not resolve(SpeedConfig(), where).cuda_graphs
    assert why in resolve(SpeedConfig(), where).off["cuda_graphs"]
    assert not resolve(SpeedConfig(cuda_graphs=False), where).cuda_graphs
    with pytest.raises(TrainingSetupError, match=why):
        resolve(SpeedConfig(cuda_graphs=True), where)


def test_auto_records_graphs_for_the_verified_encoders_and_methods_only():
    def graphs(setting="auto", **changes):
        return resolve(SpeedConfig(cuda_graphs=setting), replace(GPU, **changes)).cuda_graphs

    assert graphs() and graphs(True, precision="fp32") and not graphs(False)
    assert graphs(model_type="roberta", method="full")
    assert not graphs(model_type="modernbert") and not graphs(method="dora")
    assert graphs(True, model_type="modernbert", method="dora")


def test_padding_rounds_lengths_up_to_few_shapes_but_not_past_the_maximum():
    lengths = [3, 70, 130]
    encoded = Encoded(input_ids=[np.arange(1, n + 1) for n in lengths], token_type_ids=None,
                      labels=np.zeros(3, dtype=np.int64), truncated=0)
    collate = Collator(encoded, pad_id=0, pad_to_multiple_of=64, max_width=140)
    assert [collate([i])["input_ids"].shape[1] for i in range(3)] == [64, 128, 140]
    batch = collate([0, 1])
    assert batch["input_ids"].shape == (2, 128) and batch["attention_mask"].sum().item() == 73
    assert Collator(encoded, pad_id=0, pad_to_multiple_of=8)([1])["input_ids"].shape[1] == 72


def _dropout_free_model(tiny_models, arch, root):
    """The tiny model without dropout: graphs draw their warm-up passes' masks from the same
    generator, so only a dropout-free model trains to the same numbers both ways."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(tiny_models[arch])
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                "seq_classif_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    model = AutoModel.from_pretrained(tiny_models[arch], config=config)
    model.save_pretrained(root)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_models[arch]).save_pretrained(root)
    return root


def _evals(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "eval"]


def assert_trained_alike(reference, other, evaluations: int, tolerance: float) -> None:
    """Two runs of the same training: the same train and eval losses at every evaluation, and learned."""
    expected, got = _evals(reference), _evals(other)
    assert len(expected) == len(got) == evaluations
    for a, b in zip(expected, got):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=tolerance)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=tolerance)
    assert got[-1]["accuracy"] >= 0.7  # it learned, so the comparison means something


@needs_cuda
@pytest.mark.parametrize("arch,method,grad_accum", [("bert", "lora", 1), ("distilbert", "full", 1),
                                                    ("roberta", "lora", 2)])
def test_graphed_steps_train_as_eager_steps_do(make_config, tiny_models, tmp_path, monkeypatch, arch, method,
                                               grad_accum):
    import peftlab.training.run as train_module

    # Both runs pad to the same lengths (8, 12 and 16 tokens on the toy task), so that they compute
    # on the same shapes; graphs record one per shape, the first after warm-up passes, the others without.
    real_make_loader = train_module.make_loader
    monkeypatch.setattr(train_module, "make_loader",
                        lambda *args, **kwargs: real_make_loader(*args, **{**kwargs, "pad_to_multiple_of": 4}))
    warmups_per_graph = []
    real_record = GraphedStep._record

    def record(self, batch, warmups):
        warmups_per_graph.append(warmups)
        return real_record(self, batch, warmups)

    monkeypatch.setattr(GraphedStep, "_record", record)
    model = _dropout_free_model(tiny_models, arch, tmp_path / "model")
    kind, lr = LEARNABLE[method]
    runs = {}
    for graphs in (False, True):
        config = make_config(arch, model={"name": str(model), "max_length": 32}, method=kind,
                             train={"precision": "fp32", "grad_accum": grad_accum, "epochs": 10, "lr": lr,
                                    "warmup_ratio": 0.1}, speed={"cuda_graphs": graphs},
                             output={"name": f"graphs-{graphs}"})
        runs[graphs] = train(config)
    assert load_run(runs[True]).summary["cuda_graphs"] is True
    assert load_run(runs[False]).summary["cuda_graphs"] is False
    assert len(warmups_per_graph) >= 2 and warmups_per_graph == [2] + [0] * (len(warmups_per_graph) - 1)
    assert_trained_alike(runs[False], runs[True], evaluations=10, tolerance=1e-4)


@needs_cuda
def test_graphed_bf16_run_learns_the_toy_task(make_config):
    kind, lr = LEARNABLE["lora"]
    run = train(make_config("bert", method=kind, train={"precision": "bf16", "epochs": 10, "lr": lr,
                                                        "warmup_ratio": 0.1}))
    summary = load_run(run).summary
    assert summary["cuda_graphs"] is True
    assert summary["best"]["accuracy"] >= 0.7
