"""Data-parallel training: 2 CPU processes (gloo, started by `peftlab train --devices 2`, i.e. torchrun)
against 1 process with the same global batch.

Tolerance: every evaluation's loss within 1e-4 and accuracy within one example of the single process
(gradients are averaged across processes in another summation order), predictions within 1e-4.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import build_tokenizer, toy_rows

from peftlab.runs import load_run, read_metrics
from peftlab.serving.inference import Classifier


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT without dropout (processes draw different dropout masks) and one config per layout."""
    import transformers as tf

    root = tmp_path_factory.mktemp("ddp")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tf.AutoModel.from_config(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    toy_rows(240, seed=1).to_csv(root / "train.csv", index=False)
    toy_rows(80, seed=2).to_csv(root / "eval.csv", index=False)

    def config_file(name: str, batch_size: int):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"name": str(root / "bert"), "max_length": 32},
            "data": {"train_file": str(root / "train.csv"), "eval_file": str(root / "eval.csv")},
            "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            # 80 eval rows in batches of 7 over 2 processes: the last round is uneven and padded
            "train": {"epochs": 4, "batch_size": batch_size, "eval_batch_size": 7, "lr": 1e-2,
                      "group_by_length": False},
            "output": {"dir": str(root / "runs"), "name": name, "progress": False,
                       "cache_dir": str(root / "cache")},
        }))
        return path

    return root, config_file("one", 16), config_file("two", 8)


FSDP_LAUNCH = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_transformer_layer_cls_to_wrap", "BertLayer"]
# What that `accelerate launch` sets for its processes, for runs started with `--devices 2` (torchrun).
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "BertLayer", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


def peftlab(*args, check=True, env=None):
    result = subprocess.run([sys.executable, "-m", "peftlab", *map(str, args)], capture_output=True, text=True,
                            timeout=600, env=os.environ | (env or {}))
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single(setup):
    """The single-process run (batch 16) that every two-process run of the same config must match."""
    root, one, _ = setup
    peftlab("train", one)
    return load_run(root / "runs" / "one")


def assert_metrics_of_one(single, double, root) -> None:
    """Every evaluation's loss within 1e-4 and accuracy within one example of the single process, each
    written once and over every eval example, and the saved model predicting as the single run's."""
    evals = [[r for r in read_metrics(run.path) if r["type"] == "eval"] for run in (single, double)]
    assert len(evals[0]) == len(evals[1]) == 4  # written once, not once per process
    for a, b in zip(*evals):
        assert a["step"] == b["step"]
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 80 + 1e-9
        assert np.sum(b["confusion_matrix"]) == 80  # every eval example once: none dropped or doubled
    assert evals[0][-1]["accuracy"] > 0.6  # it learned, so the comparison means something
    assert double.summary["effective_batch_size"] == single.summary["effective_batch_size"] == 16
    assert double.summary["processes"] == 2
    # The model saved by the main process loads in one process and predicts as the single run does.
    texts = pd.read_csv(root / "eval.csv")["text"].tolist()
    assert np.allclose(Classifier.from_run(double.path).probabilities(texts),
                       Classifier.from_run(single.path).probabilities(texts), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full"])  # LoRA, sharded: test_an_interrupted_two_process_run_resumes[fsdp]
def test_fsdp_sharded_processes_give_the_metrics_of_one(setup, method):
    """`accelerate launch --use_fsdp --fsdp_version 2` with 2 CPU processes: weights, gradients and
    optimizer state sharded, the same metrics as one process with the same global batch, and a
    saved model (gathered whole from the shards) that predicts as the single process's does."""
    root, one, two = setup
    overrides = ["method={kind: full}", "train.lr=1e-3"] if method == "full" else []
    overrides.append("train.epochs=3")
    peftlab("train", one, f"output.name=fsdp-one-{method}", *overrides)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *FSDP_LAUNCH,
              "-m", "peftlab", "train", str(two), f"output.name=fsdp-two-{method}", *overrides]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sharded over 2 processes (FSDP2)" in result.stdout
    single, sharded = load_run(root / "runs" / f"fsdp-one-{method}"), load_run(root / "runs" / f"fsdp-two-{method}")
    evals = [[r for r in read_metrics(run.path) if r["type"] == "eval"] for run in (single, sharded)]
    assert len(evals[1]) == 3
    for a, b in zip(*evals):
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 80 + 1e-9
    texts = pd.read_csv(root / "eval.csv")["text"].tolist()
    assert np.allclose(Classifier.from_run(sharded.path).probabilities(texts),
                       Classifier.from_run(single.path).probabilities(texts), atol=1e-4)

@pytest.mark.slow

def test_fsdp_version_1_is_refused_with_the_fix(setup):
    _, _, two = setup
    result = peftlab("train", two, "--devices", "2", "output.name=fsdp1", env=FSDP | {"FSDP_VERSION": "1"},
                     check=False)
    assert result.returncode != 0 and "launch with --fsdp_version 2" in result.stderr + result.stdout


def test_devices_validates_the_config_before_starting_processes(setup):
    root, one, _ = setup
    result = peftlab("train", one, "train.batch_size=0", "--devices", "2", check=False)
    assert result.returncode == 2 and "batch_size" in result.stderr
    assert "starting 2 processes" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_an_interrupted_two_process_run_resumes_to_the_metrics_of_one(setup, single, layout):
    """Two processes with half the batch each give the single process's metrics, even when stopped
    and resumed. SIGTERM to the job's process group, as a scheduler sends it, reaches torchrun and both
    processes; they agree on the step to stop at, the main process checkpoints, and `resume=auto` with
    2 processes finishes the run. (Sent to torchrun alone, it can arrive after a run this small has
    finished.) Sharded (FSDP2), the checkpoint holds the weights and optimizer state gathered whole."""
    import time

    root, _, two = setup  # 4 epochs of 15 steps: the stop comes within the first dozen
    env = FSDP if layout == "fsdp" else {}
    name = f"output.name=stopped-{layout}"
    args = [sys.executable, "-m", "peftlab", "train", str(two), "--devices", "2", name, "train.checkpoint_every=3"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=os.environ | env)
    checkpoints = root / "runs" / f"stopped-{layout}.incomplete" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.exists() and any(checkpoints.glob("step-*"))):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert "8 per process x 2 process(es) x 1 accumulation step(s) = 16" in output
    assert output.count("resolved config:") == 1  # the main process speaks, once
    # Each process finishes its step, they agree to stop, the main one checkpoints and says how to go
    # on; whichever way it stopped, the run must not look finished and must resume to the end.
    assert process.returncode != 0 and not (root / "runs" / f"stopped-{layout}").exists(), output[-3000:]
    result = peftlab("train", two, "--devices", "2", name, "train.checkpoint_every=3", "resume=auto", env=env)
    assert "resumed at step" in result.stdout
    if layout == "fsdp":
        assert "sharded over 2 processes (FSDP2)" in result.stdout
    double = load_run(root / "runs" / f"stopped-{layout}")
    assert double.summary["steps"] == 4 * 15
    assert_metrics_of_one(single, double, root)

@pytest.mark.slow

def test_a_non_finite_loss_in_one_process_is_skipped_by_all(setup):
    """A batch whose loss is NaN in one process only: every process skips that step together (one
    alone would skip its gradient all-reduce and leave the others waiting in it), and the run ends
    with the single process's metrics. The NaN comes from the model: the [UNK] embedding is NaN and
    one training text holds an unknown word."""
    import transformers as tf

    root, _, _ = setup
    model = tf.AutoModel.from_pretrained(root / "bert")
    unknown = build_tokenizer().unk_token_id
    with torch.no_grad():
        model.get_input_embeddings().weight[unknown] = float("nan")
    model.save_pretrained(root / "bert-nan")
    build_tokenizer().save_pretrained(root / "bert-nan")
    rows = toy_rows(240, seed=1)
    rows.loc[17, "text"] = "unheardofword " + rows.loc[17, "text"]
    rows.to_csv(root / "train-nan.csv", index=False)
    results = {}
    for name, batch_size, devices in (("nan-one", 16, []), ("nan-two", 8, ["--devices", "2"])):
        config = yaml.safe_load((root / "one.yaml").read_text())
        config["model"]["name"] = str(root / "bert-nan")
        config["data"]["train_file"] = str(root / "train-nan.csv")
        config["train"] |= {"epochs": 2, "batch_size": batch_size, "skip_nonfinite_steps": 2}
        config["output"] |= {"name": name, "cache_dir": str(root / "cache-nan")}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        # its own process group: were the processes to hang, all of them are killed, not only torchrun
        process = subprocess.Popen([sys.executable, "-m", "peftlab", "train", str(path), *devices],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output = process.communicate(timeout=240)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"{name}: still running after 240 s: {process.communicate()[0][-3000:]}")
        assert process.returncode == 0, output[-3000:]
        results[name] = load_run(root / "runs" / name)
    single, double = results["nan-one"], results["nan-two"]
    assert single.summary["skipped_steps"] == double.summary["skipped_steps"] == 2  # once per epoch
    assert single.summary["steps"] == double.summary["steps"] == 2 * 15 - 2
    last = [[r for r in read_metrics(run.path) if r["type"] == "eval"][-1] for run in (single, double)]
    assert abs(last[0]["eval_loss"] - last[1]["eval_loss"]) < 1e-4


def test_a_signal_handled_during_the_stop_all_reduce_is_agreed_on_at_the_next_one(monkeypatch):
    """The signal reaches this process while it waits in the all-reduce whose result (the other
    process's 0) does not hold it yet: it must neither stop alone nor be forgotten, but go into the
    next all-reduce. Forgetting it let a SIGTERM'd two-process run train on to the end."""
    from types import SimpleNamespace

    from peftlab.training.resume import StopOnSignal

    stop = StopOnSignal()
    sent = []

    def all_reduce(tensor, op):  # the other process always sends 0: the MAX is this one's value...
        sent.append(int(tensor.item()))
        if len(sent) == 1:
            stop._handle(signal.SIGTERM, None)  # ... but the signal arrives mid-reduce, after it was sent

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    assert stop.agreed(accelerator) is None  # not alone: the other process does not know yet
    assert stop.agreed(accelerator) == "SIGTERM"
    assert sent == [0, int(signal.SIGTERM)]
