"""Checkpoints and resume: exact continuation, kills at any moment, corruption, disk full, signals."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import poison_training_forward
from safetensors.torch import load_file

import peftlab.training.checkpoints as checkpoints_module
from peftlab.errors import NonFiniteLossError
from peftlab.runs import read_metrics
from peftlab.training.checkpoints import CheckpointError, verify
from peftlab.training.resume import TrainingInterrupted
from peftlab.training.run import train

TIMING = {"samples_per_s", "lr"}  # lr is exact too, but kept out with the timings for readability


def comparable(run: Path) -> list[dict]:
    """metrics.jsonl without wall-clock figures: what must be identical after a resume."""
    return [{k: v for k, v in record.items() if k not in TIMING} for record in read_metrics(run)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    adapter = run / "model" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else run / "model" / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    assert comparable(a) == comparable(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def resumable(make_config, name: str, **train):
    """LoRA with dropout (so the RNG matters), checkpoints every 4 steps, 15 steps per epoch."""
    return make_config("bert", method={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                       train={"epochs": 3, "checkpoint_every": 4, "log_every_steps": 1, **train},
                       output={"name": name})


def stop_at(monkeypatch, step: int) -> None:
    """Deliver a real SIGTERM to this process while step `step` is being logged."""
    import peftlab.training.loop as loop

    real = loop.log_train

    def log_and_signal(state, *args):
        real(state, *args)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "log_train", log_and_signal)


@pytest.mark.parametrize("stop_step", [7, 15, 30])  # mid-epoch, at an epoch's end, at the next one's end
def test_sigterm_checkpoints_and_resume_gives_the_uninterrupted_run(make_config, monkeypatch, stop_step):
    straight = train(resumable(make_config, "straight"))
    config = resumable(make_config, "resumed")
    stop_at(monkeypatch, stop_step)
    with pytest.raises(TrainingInterrupted, match=rf"stopped by SIGTERM after step {stop_step}; checkpoint .*"
                                                  r"step-0+\d+; run the same command with resume=auto"):
        train(config)
    work = config.output.dir / "resumed.incomplete"
    assert not (config.output.dir / "resumed").exists()
    assert verify(work / "checkpoints" / f"step-{stop_step:08d}") is None
    monkeypatch.undo()
    resumed = train(config, resume="auto")
    assert_same_run(straight, resumed)
    assert not (resumed / "checkpoints").exists()  # a finished run keeps its best model, not its checkpoints


def test_resume_with_gradient_accumulation_is_exact(make_config, monkeypatch):
    straight = train(resumable(make_config, "straight", grad_accum=2, batch_size=8))
    config = resumable(make_config, "resumed", grad_accum=2, batch_size=8)
    stop_at(monkeypatch, 9)
    with pytest.raises(TrainingInterrupted):
        train(config)
    monkeypatch.undo()
    assert_same_run(straight, train(config, resume="auto"))


def test_full_fine_tuning_resumes_exactly_with_seen_embedding_rows(make_config, monkeypatch):
    """The checkpoint holds the embedding matrix with the decay of rows no batch trained."""
    def config(name):
        return make_config("bert", method={"kind": "full"}, train={"epochs": 2, "checkpoint_every": 4, "lr": 1e-3,
                           "weight_decay": 0.1, "log_every_steps": 1}, speed={"seen_embedding_rows": True},
                           output={"name": name})

    straight = train(config("straight"))
    resumed = config("resumed")
    stop_at(monkeypatch, 6)
    with pytest.raises(TrainingInterrupted):
        train(resumed)
    monkeypatch.undo()
    assert_same_run(straight, train(resumed, resume="auto"))


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(make_config, monkeypatch, capsys):
    straight = train(resumable(make_config, "straight"))
    config = resumable(make_config, "resumed")
    stop_at(monkeypatch, 12)
    with pytest.raises(TrainingInterrupted):
        train(config)
    monkeypatch.undo()
    root = config.output.dir / "resumed.incomplete" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000012"]  # keep_checkpoints=2
    weights_file = root / "step-00000012" / "trainable.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match=r"step-00000012/trainable.safetensors does not match its checksum"):
        train(config, resume=root / "step-00000012")
    resumed = train(config, resume="auto")
    out = capsys.readouterr().out
    assert "skipping checkpoint step-00000012" in out and "trainable.safetensors does not match" in out
    assert "resuming from" in out and "step-00000008" in out
    assert_same_run(straight, resumed)


def test_resume_refuses_a_changed_config_and_a_foreign_checkpoint(make_config, monkeypatch, tmp_path):
    config = resumable(make_config, "resumed")
    stop_at(monkeypatch, 5)
    with pytest.raises(TrainingInterrupted):
        train(config)
    monkeypatch.undo()
    changed = resumable(make_config, "resumed", lr=1e-4)
    with pytest.raises(CheckpointError, match=r"started with another config \(train.lr: 0.005 there, 0.0001 here\)"):
        train(changed, resume="auto")
    with pytest.raises(CheckpointError, match="is not a checkpoint of this run"):
        train(config, resume=tmp_path)


def test_resume_auto_without_a_checkpoint_starts_afresh(make_config, capsys):
    run = train(resumable(make_config, "fresh", epochs=1), resume="auto")
    assert "no complete checkpoint" in capsys.readouterr().out and (run / "summary.json").exists()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(make_config, monkeypatch):
    real = checkpoints_module.save_file
    calls = {"n": 0}

    def fills_up(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module, "save_file", fills_up)
    config = resumable(make_config, "full")
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000008 \(No space left on device\); "
                                              r"the previous checkpoint step-00000004 is intact"):
        train(config)
    root = config.output.dir / "full.incomplete" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000004"] and verify(root / "step-00000004") is None


def test_rewriting_a_step_never_deletes_the_old_checkpoint_in_place(tmp_path, monkeypatch):
    """The end-of-epoch checkpoint may rewrite the step just saved; the old one is swapped out by
    renames, so a failure (or a kill) between them leaves it whole."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    root = tmp_path / "checkpoints"

    def save(epoch: int) -> Path:
        state = {"progress": {"step": 5, "epoch": epoch}}
        return checkpoints_module.save_checkpoint(root, model, optimizer, scheduler, state, keep=2)

    first = save(1)
    real = os.replace

    def fails_into_place(source, target):
        if Path(target) == first and ".tmp" in Path(source).name:  # the new checkpoint into place
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        return real(source, target)

    monkeypatch.setattr(checkpoints_module.os, "replace", fails_into_place)
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        save(2)
    assert verify(first) is None and checkpoints_module.read_checkpoint(first).state["progress"]["epoch"] == 1
    monkeypatch.setattr(checkpoints_module.os, "replace", real)
    assert save(2) == first and verify(first) is None
    assert checkpoints_module.read_checkpoint(first).state["progress"]["epoch"] == 2
    assert [p.name for p in root.iterdir()] == ["step-00000005"]


def test_a_kill_while_old_checkpoints_are_deleted_leaves_none_broken(tmp_path, monkeypatch):
    """Keeping the newest checkpoints deletes older ones; a kill halfway through a deletion must not
    leave a visible step-* directory with files missing (resume would have to skip it)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    root = tmp_path / "checkpoints"

    def save(step: int) -> Path:
        return checkpoints_module.save_checkpoint(root, model, optimizer, scheduler,
                                                  {"progress": {"step": step, "epoch": 1}}, keep=2)

    save(1), save(2)
    real_rmtree = shutil.rmtree

    class Killed(BaseException):
        pass

    def killed_halfway(path, ignore_errors=False):
        files = sorted(Path(path).glob("*")) if Path(path).is_dir() else []
        if files:
            files[0].unlink()  # one file gone, then the process dies
            raise Killed
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoints_module.shutil, "rmtree", killed_halfway)
    with pytest.raises(Killed):
        save(3)
    monkeypatch.setattr(checkpoints_module.shutil, "rmtree", real_rmtree)
    visible = sorted(root.glob("step-*"))
    assert [p.name for p in visible] == ["step-00000002", "step-00000003"]
    assert all(verify(p) is None for p in visible)
    save(4)  # the next save clears what the kill left behind
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_steps_are_skipped_up_to_the_limit_and_never_saved(make_config, monkeypatch, precision):
    poison_training_forward(monkeypatch, lambda n: n in (6, 7), float("inf"))
    base = {"epochs": 1, "precision": precision}
    graphless = {"cuda_graphs": False}  # graph replays skip the poisoning hook
    with pytest.raises(NonFiniteLossError, match="at step 6 .*stopped before that optimizer step"):
        train(make_config("bert", train=base, speed=graphless, output={"name": "stops"}))
    run = train(make_config("bert", train={**base, "skip_nonfinite_steps": 2}, speed=graphless,
                            output={"name": "skips"}))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 13  # 15 batches, two without an update
    assert all(torch.isfinite(t).all() for t in weights(run).values())


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(make_config, tmp_path):
    """Three kills, some during checkpoint writes (one every step): each checkpoint is complete or
    absent, resume always works, and the end result is the uninterrupted run's."""
    straight = train(resumable(make_config, "straight", epochs=2, checkpoint_every=1))
    config = resumable(make_config, "killed", epochs=2, checkpoint_every=1)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(config.to_yaml())
    command = [sys.executable, "-m", "peftlab", "train", str(config_file), "resume=auto"]
    root = config.output.dir / "killed.incomplete" / "checkpoints"
    rng = random.Random(0)
    for _ in range(3):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = _latest_step(root)
        deadline = time.monotonic() + 60
        while _latest_step(root) <= before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        process.kill()
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
        for checkpoint in root.glob("step-*"):
            assert verify(checkpoint) is None, checkpoint
        assert not (config.output.dir / "killed").exists()
    assert _latest_step(root) >= 3  # the kills interrupted a run that was making progress
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(straight, config.output.dir / "killed")


def _latest_step(root: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in root.glob("step-*")] if root.is_dir() else []
    return max(steps, default=0)


def test_sigterm_to_the_command_exits_non_zero_saying_how_to_resume(make_config, tmp_path):
    config = resumable(make_config, "term", epochs=50, checkpoint_every=1000)
    config_file = tmp_path / "term.yaml"
    config_file.write_text(config.to_yaml())
    process = subprocess.Popen([sys.executable, "-m", "peftlab", "train", str(config_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = config.output.dir / "term.incomplete" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received; finishing this step" in out + err
    assert "run the same command with resume=auto to go on" in err
    root = config.output.dir / "term.incomplete" / "checkpoints"
    assert [verify(p) for p in root.iterdir()] == [None]
