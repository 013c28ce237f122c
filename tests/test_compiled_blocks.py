"""speed.compile: the encoder's repeated blocks compiled with torch.compile, the same training."""

from __future__ import annotations

import pytest
import torch
from test_cuda_graphs import _dropout_free_model, assert_trained_alike, needs_cuda
from test_train import LEARNABLE

import peftlab.speed.compiled_blocks as compiled_blocks
from peftlab.errors import TrainingSetupError
from peftlab.runs import load_run
from peftlab.speed.compiled_blocks import compile_blocks, repeated_blocks
from peftlab.training.run import train


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "deberta-v2"])
def test_the_repeated_blocks_are_the_encoder_layers(tiny_models, arch):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[arch], num_labels=2)
    blocks = repeated_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 2
    assert all(type(block).__name__.endswith(("Layer", "Block")) for block in blocks)
    keys = list(model.state_dict())
    assert compile_blocks(model) == 2 and list(model.state_dict()) == keys  # checkpoints read the same


def _compiled_and_eager_runs(make_config, tiny_models, tmp_path, arch, method, **train_options):
    """The dropout-free tiny model trained twice, blocks compiled and not; compiling turns the fast
    CPU dropout off, so the other run goes without it too."""
    model = _dropout_free_model(tiny_models, arch, tmp_path / "model")
    kind, lr = LEARNABLE[method]
    runs = {}
    for compiled in (False, True):
        config = make_config(arch, model={"name": str(model), "max_length": 32}, method=kind,
                             train={"epochs": 4, "lr": lr, "warmup_ratio": 0.1, **train_options},
                             speed={"compile": compiled, "fast_dropout": False},
                             output={"name": f"compiled-{compiled}"})
        runs[compiled] = train(config)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", [("bert", "lora"), ("distilbert", "full")])
def test_compiled_blocks_train_as_the_eager_ones(make_config, tiny_models, tmp_path, monkeypatch, arch, method):
    """Traced by dynamo and AOT autograd (the aot_eager backend: inductor's code generation would take
    half a minute on two cores; the GPU test below runs it): the same losses every evaluation."""
    traced = []

    def counting_backend(graph, example_inputs):
        traced.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    monkeypatch.setattr(compiled_blocks, "BACKEND", counting_backend)
    torch._dynamo.reset()
    runs = _compiled_and_eager_runs(make_config, tiny_models, tmp_path, arch, method)
    # Dynamic shapes: graphs serve every batch length. A handful, not one per length: the first layer's
    # input needs no gradient under LoRA, the later ones' does, and a batch without padding has no mask.
    assert 1 <= len(traced) <= 6
    summaries = {compiled: load_run(run).summary for compiled, run in runs.items()}
    assert summaries[True]["compiled_blocks"] == 2 and summaries[False]["compiled_blocks"] == 0
    assert summaries[True]["fast_dropout"] is False
    assert_trained_alike(runs[False], runs[True], evaluations=4, tolerance=1e-5)


def test_compiling_the_fast_cpu_dropout_is_refused_before_any_work(make_config, tmp_path):
    with pytest.raises(TrainingSetupError, match="speed.fast_dropout=true: speed.compile cannot trace its numpy masks"):
        train(make_config(speed={"compile": True, "fast_dropout": True}))
    assert not (tmp_path / "runs").exists()


@needs_cuda
def test_compiled_graphed_bf16_steps_train_as_the_eager_ones(make_config, tiny_models, tmp_path):
    """Inductor's kernels inside the CUDA graphs, each shape warmed up before its recording."""
    torch._dynamo.reset()
    runs = _compiled_and_eager_runs(make_config, tiny_models, tmp_path, "distilbert", "lora", precision="bf16")
    assert load_run(runs[True]).summary["cuda_graphs"] is True
    assert_trained_alike(runs[False], runs[True], evaluations=4, tolerance=2e-2)  # bf16, rounded where fused
