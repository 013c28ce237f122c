"""From a config to a trained, evaluated classifier in a finished run directory."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from peftlab import environment
from peftlab.config import RunConfig, TrainConfig
from peftlab.data import make_loader
from peftlab.evaluation import evaluate, model_inputs
from peftlab.methods import apply_method, count_parameters, parameter_groups, save_trained
from peftlab.metrics import headline, is_better
from peftlab.models import load_base
from peftlab.pipeline import RunData, eval_loader, make_accelerator, prepare_data
from peftlab.runs import LABELS, RunDir


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the optimizer step."""


# --------------------------------------------------------------------------- the loop


@dataclass
class Progress:
    """What the loop has done so far; becomes part of the summary."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    evals: int = 0
    best: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    window_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)


def fit(model, optimizer, scheduler, train_loader, sampler, eval_loader_, accelerator, cfg: TrainConfig,
        names: list[str], log: Callable[[dict], None], keep_best: Callable[[], None], show: bool) -> Progress:
    """The training loop: forward, backward, clip, step; log, evaluate, keep the best."""
    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    bar = tqdm(total=total, unit="step", disable=not (show and accelerator.is_main_process), dynamic_ncols=True)
    state = Progress()
    params = [p for p in model.parameters() if p.requires_grad]
    for state.epoch in range(1, cfg.epochs + 1):
        model.train()
        sampler.set_epoch(state.epoch)  # accelerate may wrap the sampler; the order is seeded by epoch
        started = time.perf_counter()
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**model_inputs(batch), labels=batch["labels"]).loss
                _check_finite(loss, state)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.window_losses.append(loss.item())
            state.samples += len(batch["labels"]) * accelerator.num_processes
            state.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every_steps == 0:
                state.train_seconds += time.perf_counter() - started
                started = time.perf_counter()
                _log_train(state, scheduler, bar, log)
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                state.train_seconds += time.perf_counter() - started
                _evaluate(model, eval_loader_, accelerator, names, state, cfg, log, keep_best)
                started = time.perf_counter()
                model.train()
            if state.step >= total:
                break
        state.train_seconds += time.perf_counter() - started
        if state.last is None or state.last["step"] != state.step:
            _evaluate(model, eval_loader_, accelerator, names, state, cfg, log, keep_best)
        if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
            state.stopped_early = state.step < total
            break
        if state.step >= total:
            break
    bar.close()
    return state


def _check_finite(loss: torch.Tensor, state: Progress) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(f"the loss became {loss.item()} at step {state.step + 1} (epoch {state.epoch}); "
                                 "training stopped before that optimizer step; lower train.lr or check the data")


def _log_train(state: Progress, scheduler, bar, log: Callable[[dict], None]) -> None:
    loss = float(np.mean(state.window_losses))
    state.epoch_losses.extend(state.window_losses)
    state.window_losses.clear()
    rate = state.samples / max(state.train_seconds, 1e-9)
    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}")
    log({"type": "train", "step": state.step, "epoch": state.epoch, "loss": loss,
         "lr": scheduler.get_last_lr()[0], "samples_per_s": rate})


def _evaluate(model, loader, accelerator, names, state: Progress, cfg: TrainConfig, log, keep_best) -> None:
    started = time.perf_counter()
    metrics = evaluate(model, loader, accelerator, names)
    state.eval_seconds += time.perf_counter() - started
    state.evals += 1
    state.epoch_losses.extend(state.window_losses)
    state.window_losses.clear()
    train_loss = float(np.mean(state.epoch_losses)) if state.epoch_losses else None
    state.epoch_losses.clear()
    record = {"type": "eval", "step": state.step, "epoch": state.epoch, "train_loss": train_loss, **metrics}
    log(record)
    state.last = record
    if is_better(cfg.best_metric, metrics[cfg.best_metric], state.best and state.best[cfg.best_metric]):
        state.best, state.evals_since_best = record, 0
        keep_best()
    else:
        state.evals_since_best += 1
    tqdm_write(f"epoch {state.epoch} step {state.step}: {headline(metrics)}", accelerator)


def tqdm_write(message: str, accelerator=None) -> None:
    from tqdm.auto import tqdm

    if accelerator is None or accelerator.is_main_process:
        tqdm.write(message)


# --------------------------------------------------------------------------- a whole run


def train(config: RunConfig) -> Path:
    """Validate, load, train, evaluate, save: returns the finished run directory."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    environment.reset_peak_memory()
    accelerator = make_accelerator(config.train)
    run = RunDir.reserve(config.output, config.method.kind) if accelerator.is_main_process else None
    data = prepare_data(config)
    names = data.splits.labels.names
    set_seed(config.train.seed)
    model = apply_method(load_base(config.model, data.splits.labels.id2label), config.method)
    counts = count_parameters(model)
    run = run.create() if run else None
    _announce(config, data, counts, run, accelerator)
    if run:
        run.save_config(config)
        run.write_json(LABELS, {"labels": names, "id2label": data.splits.labels.id2label,
                                "label2id": data.splits.labels.label2id})

    cfg = config.train
    pad_multiple = 8 if torch.cuda.is_available() else 1
    train_loader = make_loader(data.train, cfg.batch_size, shuffle=True, group_by_length=cfg.group_by_length,
                               seed=cfg.seed, pad_id=data.tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple)
    sampler = train_loader.batch_sampler
    optimizer = torch.optim.AdamW(parameter_groups(model, config.method, cfg.lr, cfg.weight_decay), lr=cfg.lr,
                                  fused=torch.cuda.is_available() or None)
    model, optimizer, train_loader, evaluation_loader = accelerator.prepare(
        model, optimizer, train_loader, eval_loader(data, cfg, pad_multiple))
    total_steps = min(math.ceil(len(train_loader) / cfg.grad_accum) * cfg.epochs, cfg.max_steps or math.inf)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round((cfg.warmup_ratio or 0.0) * total_steps)
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    def keep_best() -> None:
        if run and config.output.save_model:
            unwrapped = accelerator.unwrap_model(model)
            run.save_model(lambda d: (save_trained(unwrapped, config.method, d),
                                      data.tokenizer.save_pretrained(d)))

    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    state = fit(model, optimizer, scheduler, train_loader, sampler, evaluation_loader, accelerator, cfg, names,
                log=run.log if run else (lambda record: None), keep_best=keep_best, show=config.output.progress)
    accelerator.wait_for_everyone()
    if run is None:
        return config.output.dir
    summary = _summary(config, data, counts, state, started_at, accelerator) | {"run": run.final.name}
    final = run.finish(summary)
    tqdm_write(f"best {cfg.best_metric} {state.best[cfg.best_metric]:.4f} at epoch {state.best['epoch']}; "
               f"run saved to {final}")
    return final


def _announce(config: RunConfig, data: RunData, counts: dict, run: RunDir | None, accelerator) -> None:
    if not accelerator.is_main_process:
        return
    print("resolved config:\n" + "\n".join("  " + line for line in config.to_yaml().splitlines()))
    summary = data.summary()
    print(f"data: {summary['n_train']} train / {summary['n_eval']} eval, classes {summary['train_class_counts']}, "
          f"{summary['truncated_train']} train texts truncated to {config.model.max_length} tokens")
    for key in ("duplicate_train_texts", "conflicting_train_labels", "eval_texts_also_in_train"):
        if summary[key]:
            print(f"warning: {summary[key]} {key.replace('_', ' ')}")
    print(f"method {config.method.kind}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} "
          f"parameters ({100 * counts['trainable_share']:.3f}%); device {accelerator.device}, "
          f"precision {_precision(accelerator)}")
    if run:
        print(f"writing to {run.work} (renamed to {run.final} when finished)")


def _summary(config: RunConfig, data: RunData, counts: dict, state: Progress, started_at: str, accelerator) -> dict:
    return {
        "model": config.model.name, "method": config.method.kind,
        "best_metric": config.train.best_metric, "best": state.best, "final": state.last,
        "best_epoch": state.best["epoch"], "best_step": state.best["step"], "epochs_run": state.epoch,
        "steps": state.step, "stopped_early": state.stopped_early,
        "train_seconds": state.train_seconds, "train_samples_per_s": state.samples / max(state.train_seconds, 1e-9),
        "train_tokens_per_s": state.tokens / max(state.train_seconds, 1e-9),
        "eval_seconds": state.eval_seconds,
        "eval_samples_per_s": state.evals * len(data.eval) / max(state.eval_seconds, 1e-9),
        **environment.peak_memory_mb(), **counts,
        "effective_batch_size": config.train.batch_size * config.train.grad_accum * accelerator.num_processes,
        "precision": _precision(accelerator), "seed": config.train.seed, "data": data.summary(),
        "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": environment.library_versions(), "hardware": environment.hardware(),
        "git_revision": environment.git_revision(),
    }


def _precision(accelerator) -> str:
    return "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
