"""Whole runs on tiny models: the loop, the run directory, reproducibility, failure modes."""

import json

import pytest
import torch
from conftest import ARCHS, poison_training_forward
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.data import DataError
from peftlab.errors import NonFiniteLossError
from peftlab.runs import RunError, load_run, read_metrics
from peftlab.training.reevaluate import evaluate_run
from peftlab.training.run import train

LEARNABLE = {
    "lora": ({"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 5e-3),
    "full": ({"kind": "full"}, 2e-3),
    "dora": ({"kind": "dora", "r": 8, "alpha": 16, "dropout": 0.0}, 5e-3),
    # B learns at lr_ratio x lr: at 6e-3 (B at 1.2e-2) the tiny BERT's loss swung with each random stream
    "loraplus": ({"kind": "loraplus", "r": 8, "alpha": 16, "dropout": 0.0, "lr_ratio": 2}, 4e-3),
}


def test_run_directory_has_everything_a_report_needs(make_config):
    run = train(make_config("bert", train={"epochs": 2, "eval_every_steps": 10}))
    assert run.name == "toy" and not run.with_name("toy.incomplete").exists()
    assert {p.name for p in run.iterdir()} == {"config.yaml", "labels.json", "metrics.jsonl", "summary.json", "model"}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "model").iterdir()}
    labels = json.loads((run / "labels.json").read_text())
    assert labels["labels"] == ["neg", "pos"] and labels["label2id"] == {"neg": 0, "pos": 1}
    summary = load_run(run).summary
    for key in ("best", "final", "best_epoch", "train_seconds", "train_samples_per_s", "train_tokens_per_s",
                "eval_seconds", "peak_rss_mb", "trainable_params", "total_params", "trainable_share",
                "versions", "hardware", "seed", "git_revision", "data"):
        assert key in summary, key
    assert summary["data"]["n_train"] == 240 and summary["steps"] == 30
    assert set(summary["best"]) >= {"accuracy", "f1", "f1_macro", "f1_weighted", "precision_macro",
                                     "recall_macro", "per_class", "confusion_matrix", "eval_loss"}
    assert sum(map(sum, summary["final"]["confusion_matrix"])) == 80
    evals = [r for r in read_metrics(run) if r["type"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(1, 10), (1, 15), (2, 20), (2, 30)]
    assert all(r["train_loss"] is not None for r in evals)
    assert summary["best"] == max(evals, key=lambda r: r["f1_macro"])


# Every method on two architectures and every architecture with two methods (a cyclic Latin pattern):
# each architecture's targets are resolved in test_methods.py, so the full grid proves nothing more.
@pytest.mark.parametrize("name, arch", [(name, arch) for i, name in enumerate(LEARNABLE)
                                        for arch in (ARCHS[i % 4], ARCHS[(i + 1) % 4])])
def test_learns_the_toy_task(make_config, arch, name):
    method, lr = LEARNABLE[name]
    run = train(make_config(arch, method=method, train={"epochs": 10, "lr": lr, "warmup_ratio": 0.1}))
    losses = [r["loss"] for r in read_metrics(run) if r["type"] == "train"]
    # Window losses of 10 steps are noisy on 240 examples: compare the mean of the last five.
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    assert load_run(run).summary["best"]["accuracy"] >= 0.7


def test_eval_reproduces_the_saved_metrics_exactly(make_config, capsys):
    run = train(make_config("distilbert", train={"epochs": 2}))
    best = load_run(run).summary["best"]
    metrics = evaluate_run(run)
    for key in ("eval_loss", "accuracy", "f1", "f1_macro", "confusion_matrix"):
        assert metrics[key] == best[key], key
    assert main(["eval", str(run)]) == 0
    assert "matches the run's saved best evaluation" in capsys.readouterr().out


def test_same_seed_same_results_other_seed_other_results(make_config, tmp_path):
    runs = [train(make_config("bert", train={"epochs": 1, "seed": seed}, output={"name": name}))
            for seed, name in ((7, "a"), (7, "b"), (8, "c"))]
    weights = [load_file(str(r / "model" / "adapter_model.safetensors")) for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    bests = [load_run(r).summary["best"]["eval_loss"] for r in runs]
    assert bests[0] == bests[1] != bests[2]


def test_a_run_first_frees_what_earlier_runs_left_in_reference_cycles(make_config):
    """A study runs many runs in one process; garbage in reference cycles (a finished run's model
    among it) would otherwise live until Python's next full collection, counted in the next run's
    memory."""
    import gc
    import weakref

    class Leftover:
        pass

    leftover = Leftover()
    leftover.cycle, leftover.weights = leftover, torch.zeros(1 << 16)
    freed = weakref.ref(leftover)
    del leftover
    seen = []
    gc.disable()  # only an explicit collection can free it now
    try:
        train(make_config("bert", train={"epochs": 1}), after_eval=lambda record: seen.append(freed() is None))
    finally:
        gc.enable()
    assert seen == [True]


def test_gradient_accumulation_matches_the_larger_batch(make_config, tiny_models, tmp_path):
    from conftest import tiny_config
    from transformers import AutoModel

    config = tiny_config("bert", 53)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0  # no randomness between layouts
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "nodrop")
    (tmp_path / "nodrop").joinpath("tokenizer.json").write_bytes((tiny_models["bert"] / "tokenizer.json").read_bytes())
    (tmp_path / "nodrop").joinpath("tokenizer_config.json").write_bytes(
        (tiny_models["bert"] / "tokenizer_config.json").read_bytes())
    common = {"epochs": 1, "group_by_length": False, "max_grad_norm": None, "lr": 1e-2}
    runs = []
    for name, layout in (("big", {"batch_size": 16}), ("accum", {"batch_size": 8, "grad_accum": 2})):
        cfg = make_config("bert", model={"name": str(tmp_path / "nodrop")}, method={"kind": "full"},
                          train={**common, **layout}, output={"name": name})
        runs.append(train(cfg))
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in runs)
    assert load_run(runs[1]).summary["steps"] == load_run(runs[0]).summary["steps"] == 15
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("lagged,bad_step", [(False, 12), (True, 12), (True, 15)])
def test_non_finite_loss_stops_before_the_step_and_keeps_the_last_good_model(make_config, monkeypatch, lagged,
                                                                            bad_step):
    """Checked at once (CPU), or a step later as on a GPU: then also on the last step of an epoch (15
    batches), whose evaluation must not run first."""
    poison_training_forward(monkeypatch, lambda n: n >= bad_step)
    # `auto` lags the check on a GPU only; `true` lags it here. Op by op: a step replayed from a CUDA
    # graph would not call the poisoning hook.
    config = make_config("bert", train={"epochs": 2, "eval_every_steps": 5},
                         speed={"cuda_graphs": False, "lagged_finiteness_check": lagged})
    with pytest.raises(NonFiniteLossError, match=f"at step {bad_step} .*stopped before that optimizer step"):
        train(config)
    if bad_step == 15:
        evals = [r["step"] for r in read_metrics(config.output.dir / "toy.incomplete") if r["type"] == "eval"]
        assert evals == [5, 10]  # not step 15's
    work = config.output.dir / "toy.incomplete"
    assert not (config.output.dir / "toy").exists() and not (work / "summary.json").exists()
    saved = load_file(str(work / "model" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_bad_data_fails_before_anything_is_written(make_config, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,pos\n,neg\n")
    config = make_config("bert", data={"train_file": str(bad)})
    with pytest.raises(DataError, match="row 2, column 'text': text is missing"):
        train(config)
    assert not config.output.dir.exists()


def test_a_finished_run_is_never_overwritten_unless_asked(make_config):
    config = make_config("bert", train={"epochs": 1})
    first = train(config)
    stamp = (first / "summary.json").read_text()
    with pytest.raises(RunError, match="already exists; choose output.name or set output.overwrite=true"):
        train(make_config("bert", data={"train_file": "/nonexistent.csv"}, train={"epochs": 1}))  # checked first
    assert (first / "summary.json").read_text() == stamp
    again = train(make_config("bert", train={"epochs": 1, "seed": 3}, output={"overwrite": True}))
    assert again == first and (first / "summary.json").read_text() != stamp


def test_early_stopping_and_max_steps(make_config):
    stopped = load_run(train(make_config("bert", train={"epochs": 6, "lr": 1e-9, "early_stopping_patience": 1,
                                                         "best_metric": "accuracy"}))).summary
    assert stopped["stopped_early"] and stopped["epochs_run"] == 2
    capped = load_run(train(make_config("bert", train={"epochs": 6, "max_steps": 7}, output={"name": "cap"}))).summary
    assert capped["steps"] == 7 and capped["epochs_run"] == 1 and not capped["stopped_early"]
