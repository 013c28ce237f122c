"""Stopping a run on a signal, and picking it up again from its last complete checkpoint."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch
import yaml

from peftlab.config import RunConfig
from peftlab.config_loading import NOT_EXPERIMENT_KEYS, config_differences
from peftlab.errors import CheckpointError
from peftlab.runs import CHECKPOINTS, CONFIG, RunDir
from peftlab.training.checkpoints import (
    Checkpoint,
    find_checkpoint,
    read_checkpoint,
    restore_optimizer,
    restore_rng,
    restore_weights,
)
from peftlab.training.console import say
from peftlab.training.loop import Hooks, Progress
from peftlab.training.sharding import is_sharded

# What may change between the first start of a run and its resumption.
RESUMABLE_CHANGES = NOT_EXPERIMENT_KEYS | {"train.checkpoint_every", "train.checkpoint_each_epoch",
                                          "train.keep_checkpoints", "train.skip_nonfinite_steps"}


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT: the step finished, a checkpoint was written, the run stopped."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name))


class StopOnSignal:
    """SIGTERM and SIGINT ask the loop to finish its step, checkpoint and stop; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def agreed(self, accelerator) -> str | None:
        """The stop reason, the same in every process: a signal may reach one process a step before
        another, and a process that stopped alone would leave the others waiting in all-reduce."""
        if accelerator.num_processes > 1:
            signum = torch.tensor([getattr(signal, self.reason) if self.reason else 0], device=accelerator.device)
            torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
            agreed = int(signum.item())
            # A signal handled while this process waited in the all-reduce is not in its result: it stays
            # in self.reason (never cleared) and goes into the next call's, which every process then sees.
            if agreed:
                self.reason = signal.Signals(agreed).name
            return self.reason if agreed else None
        return self.reason

    def _handle(self, signum, frame) -> None:
        if self.reason and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        say(f"peftlab: {self.reason} received; finishing this step and writing a checkpoint")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def checkpoint_to_resume(run: RunDir, config: RunConfig, resume: str | Path) -> Checkpoint | None:
    root = run.work / CHECKPOINTS
    if str(resume) == "auto":
        checkpoint = find_checkpoint(root, log=say)
        if checkpoint is None:
            say(f"peftlab: no complete checkpoint under {root}; starting afresh")
            return None
    else:
        path = Path(resume)
        if path.resolve().parent != root.resolve():
            raise CheckpointError(f"{path} is not a checkpoint of this run (they are under {root})")
        checkpoint = read_checkpoint(path)
    saved = yaml.safe_load((run.work / CONFIG).read_text(encoding="utf-8"))
    changed = config_differences(saved, config.model_dump(mode="json"), ignore=RESUMABLE_CHANGES)
    if changed:
        raise CheckpointError(f"{run.work} was started with another config ({'; '.join(changed[:5])}); resume with "
                              "the same config, or set output.overwrite=true to start afresh")
    return checkpoint


def shared_checkpoint(checkpoint: Checkpoint | None, accelerator) -> Checkpoint | None:
    """The main process picks the checkpoint; every process restores the same one."""
    if accelerator.num_processes == 1:
        return checkpoint
    from accelerate.utils import broadcast_object_list

    path = broadcast_object_list([str(checkpoint.path) if checkpoint else None])[0]
    return checkpoint or (read_checkpoint(Path(path)) if path else None)


def resume_from(checkpoint: Checkpoint, model, optimizer, scheduler, accelerator, run: RunDir | None,
            hooks: Hooks) -> Progress:
    sharded = is_sharded(accelerator)
    restore_weights(checkpoint, model, sharded)
    restore_optimizer(checkpoint, optimizer, scheduler, model if sharded else None)
    accelerator.step = checkpoint.state["accumulation_step"]
    if accelerator.scaler and checkpoint.state.get("grad_scaler"):  # fp16 on a GPU
        accelerator.scaler.load_state_dict(checkpoint.state["grad_scaler"])
    if run:
        run.truncate_log(checkpoint.state["metrics_lines"])
    hooks.restore_rng = lambda: restore_rng(checkpoint)
    state = Progress(**checkpoint.state["progress"])
    say(f"peftlab: resumed at step {state.step} (epoch {state.epoch}, {state.batches_in_epoch} batches in)",
               accelerator)
    return state
