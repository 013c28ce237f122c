"""The training loop: step, clip, update; log, evaluate, keep the best, checkpoint."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.batching import set_sampler_epoch
from peftlab.config import TrainConfig
from peftlab.training.console import evaluate_and_log, log_train, progress_bar, say
from peftlab.training.finiteness import finite_or_skipped


@dataclass
class Progress:
    """What the loop has done so far; saved in checkpoints and summarised at the end."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained on; 0 once the epoch is done
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    evals: int = 0
    skipped_steps: int = 0
    pruned: bool = False  # an `after_eval` hook (a hyper-parameter search's pruner) asked to stop
    best: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    window_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)


@dataclass
class Hooks:
    """What the loop hands back to the run: logging, keeping the best model, checkpoints, stopping."""

    log: Callable[[dict], None]
    keep_best: Callable[[], None]
    checkpoint: Callable[[Progress], None]
    stop_requested: Callable[[], str | None]
    restore_rng: Callable[[], None] | None = None  # set when resuming: called once the data is in position
    after_eval: Callable[[dict], bool] | None = None  # True: stop at the end of this epoch


@dataclass
class Parts:
    """What the loop drives, built by the run: `training_step(batch) -> loss` runs a micro-batch's
    passes (op by op or from CUDA graphs); `clip` and `lagged` are None where not used."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    evaluation_loader: Any
    accelerator: Any
    training_step: Any
    evaluate: Callable[[], dict[str, Any]]
    clip: Callable[[], None] | None = None
    lagged: Any = None


def fit(parts: Parts, cfg: TrainConfig, hooks: Hooks, state: Progress, show: bool) -> Progress:
    """Train from `state` to the end of the last epoch (or max_steps, early stopping, a signal)."""
    p, accelerator = parts, parts.accelerator
    total = min(math.ceil(len(p.train_loader) / cfg.grad_accum) * cfg.epochs, cfg.max_steps or math.inf)
    bar = progress_bar(total, state.step, show and accelerator.is_main_process)
    pending = PendingFigures(accelerator.num_processes, settle=p.lagged.settle if p.lagged else None)
    first_epoch = state.epoch if state.batches_in_epoch else state.epoch + 1
    for state.epoch in range(first_epoch, cfg.epochs + 1):
        p.model.train()
        batches = _positioned(p.train_loader, state, hooks)
        started = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(p.model):
                loss = p.training_step(batch)
                state.batches_in_epoch += 1
                if p.lagged:
                    p.lagged.settle()  # the last step's verdict, read while this step's passes run
                    p.lagged.add(loss)
                elif not finite_or_skipped(loss, state, cfg, p.training_step, accelerator, say):
                    continue
                if accelerator.sync_gradients:
                    if p.clip:
                        p.clip()
                    if p.lagged:
                        p.lagged.hand_over(state.step + 1, state.epoch)
                p.optimizer.step()
                p.training_step.zero_grad()
            pending.add(loss, batch["attention_mask"])
            state.samples += len(batch["labels"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            p.scheduler.step()
            state.step += 1
            bar.update(1)
            state.train_seconds += time.perf_counter() - started
            if state.step % cfg.log_every_steps == 0:
                log_train(pending.read_into(state), p.scheduler, bar, hooks.log)
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                evaluate_and_log(p.evaluate, pending.read_into(state), cfg, hooks)
                p.model.train()
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or hooks.stop_requested():
                hooks.checkpoint(pending.read_into(state))
            started = time.perf_counter()
            if state.step >= total:
                break
        state.train_seconds += time.perf_counter() - started
        state.batches_in_epoch = 0
        pending.read_into(state)
        if state.last is None or state.last["step"] != state.step:
            evaluate_and_log(p.evaluate, state, cfg, hooks)
        if state.pruned or (cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience):
            state.stopped_early = state.step < total
            break
        if state.step >= total:
            break
        if cfg.checkpoint_each_epoch or hooks.stop_requested():
            hooks.checkpoint(state)
    bar.close()
    return state


class PendingFigures:
    """Each step's loss and token count, left on the device where they were computed until the loop
    logs, evaluates or checkpoints. On a GPU, reading a value waits for all the work queued before
    it: read at every step, the GPU sat idle while the host fetched the next batch. Where the
    finiteness check lags a step (speed/lagged_check.py), it is settled before any figure is read."""

    def __init__(self, processes: int, settle: Callable[[], None] | None = None) -> None:
        self.processes = processes
        self.settle = settle
        self.losses: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        self.tokens.append(attention_mask.sum())

    def read_into(self, state: Progress) -> Progress:
        if self.settle:
            self.settle()
        if self.losses:
            state.window_losses.extend(torch.stack(self.losses).float().tolist())
            state.tokens += int(torch.stack(self.tokens).sum()) * self.processes
            self.losses.clear()
            self.tokens.clear()
        return state


def _positioned(train_loader, state: Progress, hooks: Hooks):
    """This epoch's batches, past those a resumed run already trained on. accelerate's loader re-seeds
    its sampler from the epoch it is given, so the order is the one the uninterrupted run saw. RNG
    states are restored only once the loader is in position: starting it draws from the torch RNG,
    as it did in the uninterrupted run before the checkpoint was taken."""
    set_sampler_epoch(train_loader, state.epoch)
    batches = iter(train_loader)
    for _ in range(state.batches_in_epoch):
        next(batches, None)
    if hooks.restore_rng:
        hooks.restore_rng()
        hooks.restore_rng = None
    return batches
