"""What a run says as it goes: the resolved config and data at the start, progress and metrics while
it trains, the summary at the end (also written as summary.json)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from peftlab import environment
from peftlab.config import RunConfig, TrainConfig
from peftlab.metrics import headline, is_better
from peftlab.tokens import RunData


def say(message: str, accelerator=None) -> None:
    """Print above the progress bar, from the main process only."""
    from tqdm.auto import tqdm

    if accelerator is None or accelerator.is_main_process:
        tqdm.write(message)


def progress_bar(total: float, initial: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not show, dynamic_ncols=True)


def log_train(state, scheduler, bar, log: Callable[[dict], None]) -> None:
    loss = float(np.mean(state.window_losses))
    state.epoch_losses.extend(state.window_losses)
    state.window_losses.clear()
    rate = state.samples / max(state.train_seconds, 1e-9)
    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}")
    log({"type": "train", "step": state.step, "epoch": state.epoch, "loss": loss,
         "lr": scheduler.get_last_lr()[0], "samples_per_s": rate})


def evaluate_and_log(evaluate: Callable[[], dict[str, Any]], state, cfg: TrainConfig, hooks) -> None:
    """Evaluate, log the record, keep the model if it is the best so far, ask the pruner."""
    started = time.perf_counter()
    metrics = evaluate()
    state.eval_seconds += time.perf_counter() - started
    state.evals += 1
    state.epoch_losses.extend(state.window_losses)
    state.window_losses.clear()
    train_loss = float(np.mean(state.epoch_losses)) if state.epoch_losses else None
    state.epoch_losses.clear()
    record = {"type": "eval", "step": state.step, "epoch": state.epoch, "train_loss": train_loss, **metrics}
    hooks.log(record)
    state.last = record
    state.pruned = state.pruned or bool(hooks.after_eval and hooks.after_eval(record))
    if is_better(cfg.best_metric, metrics[cfg.best_metric], state.best and state.best[cfg.best_metric]):
        state.best, state.evals_since_best = record, 0
        hooks.keep_best()
    else:
        state.evals_since_best += 1
    say(f"epoch {state.epoch} step {state.step}: {headline(metrics)}")


def announce(config: RunConfig, data: RunData, counts: dict, run, accelerator, plan, sharded: bool) -> None:
    if not accelerator.is_main_process:
        return
    print("resolved config:\n" + "\n".join("  " + line for line in config.to_yaml().splitlines()))
    summary = data.summary()
    print(f"data: {summary['n_train']} train / {summary['n_eval']} eval, classes {summary['train_class_counts']}, "
          f"{summary['truncated_train']} train texts longer than {config.model.max_length} tokens"
          + {"truncate": " (truncated)", "head_tail": " (head and tail kept)",
             "chunks": f" (read in {summary.get('train_windows')} windows)"}[config.data.long_texts])
    if hint := long_texts_hint(config.data.long_texts, summary["train_text_tokens"], config.model.max_length):
        print(hint)
    for key in ("duplicate_train_texts", "conflicting_train_labels", "eval_texts_also_in_train"):
        if summary[key]:
            print(f"warning: {summary[key]} {key.replace('_', ' ')}")
    print(f"method {config.method.kind}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} "
          f"parameters ({100 * counts['trainable_share']:.3f}%); device {accelerator.device}, "
          f"precision {precision(accelerator)}")
    print(plan.describe() + (f" ({plan.compiled_blocks} encoder blocks compiled)" if plan.compiled_blocks else ""))
    if plan.seen_rows is not None:
        print(f"embedding: each step updates the {plan.seen_rows:,} of {plan.embedding_rows:,} rows whose tokens "
              "occur in the training data (the others' gradients are zero)")
    hint = bf16_hint(environment.cpu_bf16_matmul()) \
        if accelerator.device.type == "cpu" and precision(accelerator) == "fp32" else None
    if hint:
        print(hint)
    cfg = config.train
    print(f"batch: {cfg.batch_size} per process x {accelerator.num_processes} process(es) x {cfg.grad_accum} "
          f"accumulation step(s) = {effective_batch(cfg, accelerator)} examples per optimizer step")
    if sharded:
        print(f"weights, gradients and optimizer state sharded over {accelerator.num_processes} processes (FSDP2)")
    if run:
        print(f"writing to {run.work} (renamed to {run.final} when finished)")


# Past this share of texts cut by truncation, the run says how to read the rest of them.
LONG_TEXTS_HINT_SHARE = 0.2


def long_texts_hint(mode: str, lengths: dict, max_length: int) -> str | None:
    if mode != "truncate" or lengths.get("share_longer", 0.0) <= LONG_TEXTS_HINT_SHARE:
        return None
    return (f"hint: {100 * lengths['share_longer']:.0f}% of the training texts are longer than max_length={max_length} "
            f"tokens (median {lengths['median_tokens']:.0f}, 95th percentile {lengths['p95_tokens']:.0f}) and are cut; "
            "data.long_texts=chunks (or head_tail) reads the rest of them (docs/long-documents.md)")


def bf16_hint(cpu_bf16: str | None) -> str | None:
    """Where the CPU multiplies bf16 natively, the speed fp32 leaves unused (bench/RESULTS.md)."""
    if cpu_bf16 is None:
        return None
    return (f"hint: this CPU multiplies bf16 matrices natively ({environment.BF16_MATMUL_NAMES[cpu_bf16]}); "
            "train.precision=bf16 trained faster at the same F1 in peftlab's benchmark (bench/RESULTS.md)")


def run_summary(config: RunConfig, data: RunData, counts: dict, state, started_at: str, accelerator) -> dict:
    return {
        "model": config.model.name, "method": config.method.kind,
        "best_metric": config.train.best_metric, "best": state.best, "final": state.last,
        "best_epoch": state.best["epoch"], "best_step": state.best["step"], "epochs_run": state.epoch,
        "steps": state.step, "skipped_steps": state.skipped_steps, "stopped_early": state.stopped_early,
        "pruned": state.pruned,
        "train_seconds": state.train_seconds, "train_samples_per_s": state.samples / max(state.train_seconds, 1e-9),
        "train_tokens_per_s": state.tokens / max(state.train_seconds, 1e-9),
        "eval_seconds": state.eval_seconds,
        "eval_samples_per_s": state.evals * len(data.eval) / max(state.eval_seconds, 1e-9),
        **environment.peak_memory_mb(), **counts,
        "effective_batch_size": effective_batch(config.train, accelerator), "processes": accelerator.num_processes,
        "precision": precision(accelerator), "seed": config.train.seed, "data": data.summary(),
        "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": environment.library_versions(), "hardware": environment.hardware(),
        "git_revision": environment.git_revision(),
    }


def effective_batch(cfg: TrainConfig, accelerator) -> int:
    return cfg.batch_size * cfg.grad_accum * accelerator.num_processes


def precision(accelerator) -> str:
    return "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
