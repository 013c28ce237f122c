"""Data-parallel training: 2 CPU processes (gloo, started by `peftlab train --devices 2`, i.e. torchrun)
against 1 process with the same global batch.

Tolerance: every evaluation's loss within 1e-4 and accuracy within one example of the single process
(gradients are averaged across processes in another summation order), predictions within 1e-4.
"""

import json
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
from peftlab.inference import Classifier
from peftlab.runs import load_run, read_metrics


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
            "train": {"epochs": 6, "batch_size": batch_size, "eval_batch_size": 7, "lr": 1e-2,
                      "group_by_length": False},
            "output": {"dir": str(root / "runs"), "name": name, "progress": False,
                       "cache_dir": str(root / "cache")},
        }))
        return path

    return root, config_file("one", 16), config_file("two", 8)


def peftlab(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "peftlab", *map(str, args)], capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_give_the_metrics_of_one_with_the_same_global_batch(setup):
    root, one, two = setup
    peftlab("train", one)
    result = peftlab("train", two, "--devices", "2")
    assert "8 per process x 2 process(es) x 1 accumulation step(s) = 16" in result.stdout
    assert result.stdout.count("resolved config:") == 1  # the main process speaks, once

    single, double = load_run(root / "runs" / "one"), load_run(root / "runs" / "two")
    evals = [[r for r in read_metrics(run.path) if r["type"] == "eval"] for run in (single, double)]
    assert len(evals[0]) == len(evals[1]) == 6  # written once, not once per process
    for a, b in zip(*evals):
        assert a["step"] == b["step"]
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 80 + 1e-9
        assert np.sum(b["confusion_matrix"]) == 80  # every eval example once: none dropped or doubled
    assert evals[0][-1]["accuracy"] > 0.6  # it learned, so the comparison means something
    assert double.summary["effective_batch_size"] == single.summary["effective_batch_size"] == 16
    assert double.summary["processes"] == 2

    # The adapter saved by the main process loads in one process and predicts as the single run does.
    texts = pd.read_csv(root / "eval.csv")["text"].tolist()
    assert np.allclose(Classifier.from_run(double.path).probabilities(texts),
                       Classifier.from_run(single.path).probabilities(texts), atol=1e-4)


def test_devices_validates_the_config_before_starting_processes(setup):
    root, one, _ = setup
    result = peftlab("train", one, "train.batch_size=0", "--devices", "2", check=False)
    assert result.returncode == 2 and "batch_size" in result.stderr
    assert "starting 2 processes" not in result.stderr


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes(setup):
    """SIGTERM to the job's process group, as a scheduler sends it, reaches torchrun and both processes;
    they agree on the step to stop at, the main process checkpoints, and `resume=auto` with 2 processes
    finishes the run. (Sent to torchrun alone, it can arrive after a run this small has finished.)"""
    import signal
    import time

    root, _, two = setup
    args = [sys.executable, "-m", "peftlab", "train", str(two), "--devices", "2", "output.name=stopped",
            "train.epochs=25", "train.checkpoint_every=3"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    checkpoints = root / "runs" / "stopped.incomplete" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.exists() and any(checkpoints.glob("step-*"))):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    # Each process finishes its step, they agree to stop, the main one checkpoints and says how to go
    # on; whichever way it stopped, the run must not look finished and must resume to the end.
    assert process.returncode != 0 and not (root / "runs" / "stopped").exists(), output[-3000:]
    result = peftlab("train", two, "--devices", "2", "output.name=stopped", "train.epochs=25",
                     "train.checkpoint_every=3", "resume=auto")
    assert "resumed at step" in result.stdout
    evals = [r for r in read_metrics(root / "runs" / "stopped") if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == list(range(1, 26))
    summary = json.loads((root / "runs" / "stopped" / "summary.json").read_text())
    assert summary["steps"] == 25 * 15


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
