"""From a config to a trained, evaluated classifier in a finished run directory."""

from __future__ import annotations

import functools
import gc
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from peftlab import environment
from peftlab.attention_kernels import planless_attention
from peftlab.checkpoints import (
    Checkpoint,
    CheckpointError,
    abandon_after,
    find_checkpoint,
    read_checkpoint,
    restore_optimizer,
    restore_rng,
    restore_weights,
    save_checkpoint,
)
from peftlab.clipping import gradient_clipper
from peftlab.compiled_blocks import compile_blocks
from peftlab.config import (
    NOT_EXPERIMENT_KEYS,
    RunConfig,
    TrainConfig,
    config_differences,
)
from peftlab.data import make_loader, set_sampler_epoch
from peftlab.embedding_rows import SeenRowsEmbedding, follow_optimizer, train_seen_rows_only
from peftlab.evaluation import evaluate
from peftlab.fast_dropout import use_fast_dropout
from peftlab.finiteness import LaggedCheck, NonFiniteLossError, can_lag, finite_or_skipped
from peftlab.first_token import compute_first_token_only
from peftlab.methods import (
    apply_method,
    count_parameters,
    parameter_groups,
    save_trained,
    store_frozen_linears_in,
)
from peftlab.metrics import headline, is_better, load_scorers
from peftlab.models import load_base
from peftlab.packed_linear import pack_frozen_linears
from peftlab.packed_tokens import pack_tokens_to_train
from peftlab.pipeline import RunData, TrainingSetupError, eval_loader, make_accelerator, prepare_data, run_identity
from peftlab.runs import CHECKPOINTS, CONFIG, LABELS, RunDir, RunError
from peftlab.sharding import gathered_optimizer, gathered_trainable, is_sharded
from peftlab.step_passes import (
    GRAPH_LENGTH_STEP,
    EagerPasses,
    GraphedPasses,
    cuda_graphs_possible,
    wants_cuda_graphs,
)
from peftlab.unpadded_attention import flash_capable, use_unpadded_attention

# What may change between the first start of a run and its resumption.
RESUMABLE_CHANGES = NOT_EXPERIMENT_KEYS | {"train.checkpoint_every", "train.checkpoint_each_epoch",
                                          "train.keep_checkpoints", "train.skip_nonfinite_steps"}


# bf16 autocast over fp32 in the CPU benchmark (bench/RESULTS.md), by the CPU's bf16 matrix instructions.
BF16_CPU_GAIN = {"amx": "1.4x", "avx512_bf16": "1.4-1.6x"}

# Methods whose frozen linear weights are only ever read by autocast matmuls (DoRA also takes their norms).
CAST_FROZEN_METHODS = {"head", "lora", "loraplus", "ia3"}


# --------------------------------------------------------------------------- the loop


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
class SpeedPaths:
    """Which of peftlab's speed paths a run takes: announced, and recorded in its summary.json."""

    fast_dropout: bool = False
    unpadded_attention: bool = False
    first_token_last_layer: bool = False
    packed_tokens: bool = False
    compiled_blocks: int = 0
    seen_rows: SeenRowsEmbedding | None = None
    cuda_graphs: bool = False

    def summary(self) -> dict:
        return {"fast_dropout": self.fast_dropout, "unpadded_attention": self.unpadded_attention,
                "first_token_last_layer": self.first_token_last_layer, "packed_tokens": self.packed_tokens,
                "compiled_blocks": self.compiled_blocks,
                "seen_embedding_rows": len(self.seen_rows.seen_ids) if self.seen_rows is not None else None,
                "cuda_graphs": self.cuda_graphs}


@dataclass
class Hooks:
    """What the loop hands back to the run: logging, keeping the best model, checkpoints, stopping."""

    log: Callable[[dict], None]
    keep_best: Callable[[], None]
    checkpoint: Callable[[Progress], None]
    stop_requested: Callable[[], str | None]
    restore_rng: Callable[[], None] | None = None  # set when resuming: called once the data is in position
    after_eval: Callable[[dict], bool] | None = None  # True: stop at the end of this epoch


def fit(model, optimizer, scheduler, train_loader, eval_loader_, accelerator, cfg: TrainConfig, names: list[str],
        hooks: Hooks, state: Progress, show: bool, graphs: bool = False, compiled: bool = False) -> Progress:
    """The training loop: forward, backward, clip, step; log, evaluate, keep the best, checkpoint."""
    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    bar = tqdm(total=total, initial=state.step, unit="step", disable=not (show and accelerator.is_main_process),
               dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = gradient_clipper(accelerator, optimizer, params, cfg.max_grad_norm) if cfg.max_grad_norm else None
    passes = (GraphedPasses(model, optimizer, accelerator, params, warm_every_shape=compiled) if graphs
              else EagerPasses(model, optimizer, accelerator))
    lagged = LaggedCheck(optimizer) if can_lag(cfg, accelerator, optimizer, is_sharded(accelerator)) else None
    unread = UnreadFigures(accelerator.num_processes, settle=lagged.settle if lagged else None)
    first_epoch = state.epoch if state.batches_in_epoch else state.epoch + 1
    for state.epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        batches = _positioned(train_loader, state, hooks)
        started = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                loss = passes.forward(batch)
                state.batches_in_epoch += 1
                if lagged:
                    lagged.settle()  # the last step's verdict, read while this step's passes run
                    lagged.add(loss)
                elif not finite_or_skipped(loss, state, cfg, passes, accelerator, lambda m: tqdm_write(m, accelerator)):
                    continue
                passes.backward(loss)
                if accelerator.sync_gradients:
                    if clip:
                        clip()
                    if lagged:
                        lagged.hand_over(state.step + 1, state.epoch)
                optimizer.step()
                passes.zero_grad()
            unread.add(loss, batch["attention_mask"])
            state.samples += len(batch["labels"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            bar.update(1)
            state.train_seconds += time.perf_counter() - started
            if state.step % cfg.log_every_steps == 0:
                _log_train(unread.read_into(state), scheduler, bar, hooks.log)
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                _evaluate(model, eval_loader_, accelerator, names, unread.read_into(state), cfg, hooks)
                model.train()
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or hooks.stop_requested():
                hooks.checkpoint(unread.read_into(state))
            started = time.perf_counter()
            if state.step >= total:
                break
        state.train_seconds += time.perf_counter() - started
        state.batches_in_epoch = 0
        unread.read_into(state)
        if state.last is None or state.last["step"] != state.step:
            _evaluate(model, eval_loader_, accelerator, names, state, cfg, hooks)
        if state.pruned or (cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience):
            state.stopped_early = state.step < total
            break
        if state.step >= total:
            break
        if cfg.checkpoint_each_epoch or hooks.stop_requested():
            hooks.checkpoint(state)
    bar.close()
    return state


class UnreadFigures:
    """Each step's loss and token count, left where they were computed until the loop logs,
    evaluates or checkpoints. On a GPU, reading a value waits for all the work queued before it:
    read at every step, the GPU sat idle while the host fetched the next batch. Where the finiteness
    check lags a step (finiteness.py), it is settled before any figure is read."""

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


def _log_train(state: Progress, scheduler, bar, log: Callable[[dict], None]) -> None:
    loss = float(np.mean(state.window_losses))
    state.epoch_losses.extend(state.window_losses)
    state.window_losses.clear()
    rate = state.samples / max(state.train_seconds, 1e-9)
    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}")
    log({"type": "train", "step": state.step, "epoch": state.epoch, "loss": loss,
         "lr": scheduler.get_last_lr()[0], "samples_per_s": rate})


def _evaluate(model, loader, accelerator, names, state: Progress, cfg: TrainConfig, hooks: Hooks) -> None:
    started = time.perf_counter()
    metrics = evaluate(model, loader, accelerator, names)
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
    tqdm_write(f"epoch {state.epoch} step {state.step}: {headline(metrics)}", accelerator)


def tqdm_write(message: str, accelerator=None) -> None:
    from tqdm.auto import tqdm

    if accelerator is None or accelerator.is_main_process:
        tqdm.write(message)


# --------------------------------------------------------------------------- a whole run


def train(config: RunConfig, resume: str | Path | None = None,
          after_eval: Callable[[dict], bool] | None = None) -> Path:
    """Validate, load, train, evaluate, save: returns the finished run directory. `resume`: "auto"
    (the latest complete checkpoint of this run, or a fresh start) or the path of one checkpoint.
    `after_eval(record)` sees every evaluation; True ends training after the epoch (a pruned trial).
    The run's lock (runs.RunLock) is held from the start until the run is in place, and let go
    whichever way train() ends."""
    if resume is not None and not config.output.name:
        raise RunError(f"resume={resume} needs output.name, the name of the run to continue (without it each "
                       "start is a new run named after the time)")
    with ExitStack() as cleanup:
        return _train(config, resume, after_eval, cleanup)


def _train(config: RunConfig, resume: str | Path | None, after_eval: Callable[[dict], bool] | None,
           cleanup: ExitStack) -> Path:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    # A finished run's model and optimizer stay in reference cycles (its closures, and the frames of
    # imports it made that libraries keep with their exceptions) until Python's next full collection:
    # a study's or a search's process held each run's memory into the next and reported it as the
    # next run's. Collected and handed back here, before this run measures its peak.
    gc.collect()
    environment.release_freed_memory()
    environment.reset_peak_memory()
    accelerator = make_accelerator(config.train)
    graphs_possible = cuda_graphs_possible(config.train.cuda_graphs, accelerator, is_sharded(accelerator))
    unpadded_possible = _unpadded_attention_possible(config.train, accelerator)
    if config.train.compile and is_sharded(accelerator):
        raise TrainingSetupError("train.compile=true is not verified with FSDP sharding; leave it off")
    if accelerator.device.type == "cpu":
        environment.keep_freed_memory()
        environment.cache_more_cpu_kernels()
    run = RunDir.reserve(config.output, config.method.kind, resume) if accelerator.is_main_process else None
    if run:
        cleanup.callback(run.release)
    checkpoint = _checkpoint_to_resume(run, config, resume) if run and resume else None
    checkpoint = _shared_checkpoint(checkpoint, accelerator)
    with accelerator.main_process_first():  # the others read the tokens it caches
        data = prepare_data(config)
    names = data.splits.labels.names
    # Hashing the base weights reads them all: only for a run that checkpoints or resumes.
    identity = functools.cache(lambda: run_identity(config, data))
    if run and checkpoint:
        _check_identity(checkpoint, identity())
        for path in abandon_after(run.work / CHECKPOINTS, checkpoint.state["progress"]["step"]):
            tqdm_write(f"peftlab: set aside the checkpoint after the one resumed from, as {path.name}")
    load_scorers()
    set_seed(config.train.seed)
    model = apply_method(load_base(config.model, data.splits.labels.id2label), config.method)
    paths = SpeedPaths(fast_dropout=_wants_fast_dropout(config.train, accelerator))
    if paths.fast_dropout:
        use_fast_dropout(model)
    paths.unpadded_attention = unpadded_possible and use_unpadded_attention(model)
    paths.first_token_last_layer = _wants_first_token(config.train, accelerator) and compute_first_token_only(model)
    paths.packed_tokens = paths.fast_dropout and _wants_packed_tokens(config.train, accelerator) \
        and pack_tokens_to_train(model)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    sharded = is_sharded(accelerator)
    if autocast_dtype and config.method.kind in CAST_FROZEN_METHODS and not sharded:  # FSDP2 shards one dtype
        store_frozen_linears_in(model, autocast_dtype)
        # The model is still on the CPU here, wherever it trains; packed weights are untried under torch.compile.
        if accelerator.device.type == "cpu" and not config.train.compile:
            pack_frozen_linears(model)  # only frozen bf16 layers on a CPU with oneDNN's bf16 ops
    paths.compiled_blocks = compile_blocks(model) if config.train.compile else 0  # compiles at the first step
    counts = count_parameters(model)  # before the seen rows: all of the embedding matrix is trained
    if _wants_seen_rows(config.train, accelerator):
        paths.seen_rows = train_seen_rows_only(model, data.train.input_ids)
    # The seen rows check each batch's token ids on the host, which a CUDA graph cannot record (and a
    # failed recording leaves torch's CUDA random generator unusable for the rest of the process).
    paths.cuda_graphs = paths.seen_rows is None and wants_cuda_graphs(config.train.cuda_graphs, graphs_possible,
                                                                      model.config.model_type, config.method.kind)
    run = run.create(resuming=checkpoint is not None) if run else None
    _announce(config, data, counts, run, accelerator, paths)
    if run and not checkpoint:
        run.save_config(config)
        run.write_json(LABELS, {"labels": names, "id2label": data.splits.labels.id2label,
                                "label2id": data.splits.labels.label2id})

    cfg = config.train
    pad_multiple = 8 if torch.cuda.is_available() else 1
    train_loader = make_loader(data.train, cfg.batch_size, shuffle=True, group_by_length=cfg.group_by_length,
                               seed=cfg.seed, pad_id=data.tokenizer.pad_token_id,
                               pad_to_multiple_of=GRAPH_LENGTH_STEP if paths.cuda_graphs else pad_multiple,
                               max_width=config.model.max_length)
    # The fused kernel updates all tensors in one pass; on a CPU it made full fine-tuning 1.4x faster.
    optimizer = torch.optim.AdamW(parameter_groups(model, config.method, cfg.lr, cfg.weight_decay), lr=cfg.lr,
                                  fused=True)
    follow_optimizer(model, optimizer)
    model, optimizer, train_loader, evaluation_loader = accelerator.prepare(
        model, optimizer, train_loader, eval_loader(data, cfg, pad_multiple))
    total_steps = min(math.ceil(len(train_loader) / cfg.grad_accum) * cfg.epochs, cfg.max_steps or math.inf)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round((cfg.warmup_ratio or 0.0) * total_steps)
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    unwrapped = accelerator.unwrap_model(model)

    def keep_best() -> None:
        if not config.output.save_model:
            return
        trained = gathered_trainable(model) if sharded else None  # every process takes part
        if run:
            _refuse_non_finite(trained if sharded else _trained_parameters(unwrapped))
            run.save_model(lambda d: (save_trained(unwrapped, config.method, d, trained),
                                      data.tokenizer.save_pretrained(d)))

    def checkpoint_and_maybe_stop(progress: Progress) -> None:
        """Checkpoint; then, if a signal asked for it, stop with a message saying how to resume."""
        saved = None
        whole = (gathered_trainable(model), gathered_optimizer(model, optimizer)) if sharded else None
        if run:
            _refuse_non_finite(whole[0] if whole else _trained_parameters(unwrapped))
            saved = save_checkpoint(run.work / CHECKPOINTS, unwrapped, optimizer, scheduler,
                                    {"progress": asdict(progress), "metrics_lines": run.log_lines(),
                                     "identity": identity(), "accumulation_step": accelerator.step,
                                     "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler else None},
                                    keep=cfg.keep_checkpoints, sharded=whole)
        if stop.agreed(accelerator):  # every process checkpoints here, so every process asks
            again = "resume=auto" if config.output.name or not run else f"resume=auto output.name={run.final.name}"
            raise TrainingInterrupted(stop.reason, f"stopped by {stop.reason} after step {progress.step}; "
                                      f"checkpoint {saved}; run the same command with {again} to go on")

    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    with StopOnSignal() as stop:
        hooks = Hooks(log=run.log if run else (lambda record: None), keep_best=keep_best,
                      checkpoint=checkpoint_and_maybe_stop, stop_requested=lambda: stop.agreed(accelerator),
                      after_eval=after_eval)
        state = _resume(checkpoint, unwrapped, optimizer, scheduler, accelerator, run, hooks) if checkpoint \
            else Progress()
        with planless_attention(accelerator.device):
            state = fit(model, optimizer, scheduler, train_loader, evaluation_loader, accelerator, cfg, names, hooks,
                        state, show=config.output.progress, graphs=paths.cuda_graphs,
                        compiled=paths.compiled_blocks > 0)
    accelerator.wait_for_everyone()
    if run is None:
        return config.output.dir
    summary = _summary(config, data, counts, state, started_at, accelerator) | {"run": run.final.name} \
        | paths.summary()
    final = run.finish(summary)
    tqdm_write(f"best {cfg.best_metric} {state.best[cfg.best_metric]:.4f} at epoch {state.best['epoch']}; "
               f"run saved to {final}")
    return final


# --------------------------------------------------------------------------- stopping and resuming


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
        tqdm_write(f"peftlab: {self.reason} received; finishing this step and writing a checkpoint")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _checkpoint_to_resume(run: RunDir, config: RunConfig, resume: str | Path) -> Checkpoint | None:
    root = run.work / CHECKPOINTS
    if str(resume) == "auto":
        checkpoint = find_checkpoint(root, log=tqdm_write)
        if checkpoint is None:
            tqdm_write(f"peftlab: no complete checkpoint under {root}; starting afresh")
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


IDENTITY_NAMES = {"data": "the training or evaluation data (texts, their labels or tokenization)",
                  "labels": "the label names", "base_model": "the base model's weights (model.name's files)"}


def _check_identity(checkpoint: Checkpoint, current: dict[str, Any]) -> None:
    """Refuse a resume where the data, the label names or the base weights differ from the checkpoint's;
    a checkpoint written before they were kept is accepted with a warning."""
    saved = checkpoint.state.get("identity")
    if not saved:
        tqdm_write(f"peftlab: warning: checkpoint {checkpoint.path.name} predates the data, label and base model "
                   "fingerprints; resuming without checking that they are unchanged")
        return
    changed = []
    for key, what in IDENTITY_NAMES.items():
        there, here = saved.get(key), current.get(key)
        if there is not None and here is not None and there != here:
            changed.append(f"{what} ({there} there, {here} here)" if key == "labels" else what)
    if changed:
        raise CheckpointError(f"checkpoint {checkpoint.path} was written for other inputs: {'; '.join(changed)} "
                              "changed since; resume with the same ones, or set output.overwrite=true to start afresh")


def _shared_checkpoint(checkpoint: Checkpoint | None, accelerator) -> Checkpoint | None:
    """The main process picks the checkpoint; every process restores the same one."""
    if accelerator.num_processes == 1:
        return checkpoint
    from accelerate.utils import broadcast_object_list

    path = broadcast_object_list([str(checkpoint.path) if checkpoint else None])[0]
    return checkpoint or (read_checkpoint(Path(path)) if path else None)


def _resume(checkpoint: Checkpoint, model, optimizer, scheduler, accelerator, run: RunDir | None,
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
    tqdm_write(f"peftlab: resumed at step {state.step} (epoch {state.epoch}, {state.batches_in_epoch} batches in)",
               accelerator)
    return state


def _trained_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _refuse_non_finite(weights: dict[str, torch.Tensor]) -> None:
    for name, tensor in weights.items():
        if not torch.isfinite(tensor).all():
            raise NonFiniteLossError(f"parameter {name} became non-finite; nothing was saved from this step on")


def _announce(config: RunConfig, data: RunData, counts: dict, run: RunDir | None, accelerator,
              paths: SpeedPaths) -> None:
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
          f"precision {_precision(accelerator)}, "
          f"{'fast CPU dropout' if paths.fast_dropout else 'torch dropout'}"
          f"{', steps replayed from CUDA graphs' if paths.cuda_graphs else ''}"
          f"{', attention over unpadded tokens' if paths.unpadded_attention else ''}"
          f"{', last layer for the first token only' if paths.first_token_last_layer else ''}"
          f"{', layers on real tokens only' if paths.packed_tokens else ''}"
          f"{f', {paths.compiled_blocks} encoder blocks compiled' if paths.compiled_blocks else ''}")
    if (seen_rows := paths.seen_rows) is not None:
        print(f"embedding: each step updates the {len(seen_rows.seen_ids):,} of {seen_rows.num_embeddings:,} rows whose "
              "tokens occur in the training data (the others' gradients are zero)")
    hint = _bf16_hint(environment.cpu_bf16_matmul()) \
        if accelerator.device.type == "cpu" and _precision(accelerator) == "fp32" else None
    if hint:
        print(hint)
    cfg = config.train
    print(f"batch: {cfg.batch_size} per process x {accelerator.num_processes} process(es) x {cfg.grad_accum} "
          f"accumulation step(s) = {_effective_batch(cfg, accelerator)} examples per optimizer step")
    if is_sharded(accelerator):
        print(f"weights, gradients and optimizer state sharded over {accelerator.num_processes} processes (FSDP2)")
    if run:
        print(f"writing to {run.work} (renamed to {run.final} when finished)")


def _bf16_hint(cpu_bf16: str | None) -> str | None:
    """Where the CPU multiplies bf16 natively, the speed fp32 leaves unused (bench/RESULTS.md)."""
    if cpu_bf16 is None:
        return None
    return (f"hint: this CPU multiplies bf16 matrices natively ({environment.BF16_MATMUL_NAMES[cpu_bf16]}); "
            f"train.precision=bf16 trained {BF16_CPU_GAIN[cpu_bf16]} faster at the same F1 in peftlab's benchmark "
            "(bench/RESULTS.md)")


def _summary(config: RunConfig, data: RunData, counts: dict, state: Progress, started_at: str, accelerator) -> dict:
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
        "effective_batch_size": _effective_batch(config.train, accelerator), "processes": accelerator.num_processes,
        "precision": _precision(accelerator), "seed": config.train.seed, "data": data.summary(),
        "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": environment.library_versions(), "hardware": environment.hardware(),
        "git_revision": environment.git_revision(),
    }


def _wants_first_token(cfg: TrainConfig, accelerator) -> bool:
    """`auto`: on a CPU, unless compiling (untried with compiled blocks)."""
    return cfg.first_token_last_layer is True or (cfg.first_token_last_layer == "auto"
                                                  and accelerator.device.type == "cpu" and not cfg.compile)


def _wants_packed_tokens(cfg: TrainConfig, accelerator) -> bool:
    """On a CPU (untried on GPUs, which attend over unpadded tokens already); `auto`: for random
    batches (length-grouped ones have little padding to leave out)."""
    return accelerator.device.type == "cpu" and (cfg.packed_tokens is True or (cfg.packed_tokens == "auto"
                                                                              and not cfg.group_by_length))


def _wants_fast_dropout(cfg: TrainConfig, accelerator) -> bool:
    """`auto`: on a CPU, unless compiling (inductor draws its own fused masks; numpy's cannot be traced)."""
    return cfg.fast_dropout is True or (cfg.fast_dropout == "auto" and accelerator.device.type == "cpu"
                                        and not cfg.compile)


def _unpadded_attention_possible(cfg: TrainConfig, accelerator) -> bool:
    """Whether flash attention's variable-length kernel can run here; `true` where it cannot is
    refused before any work."""
    why_not = ("it needs a CUDA GPU of the Ampere generation or newer" if not flash_capable(accelerator.device)
               else "flash attention needs bf16 or fp16 (train.precision)"
               if accelerator.mixed_precision not in ("bf16", "fp16") else None)
    if cfg.unpadded_attention is True and why_not:
        raise TrainingSetupError(f"train.unpadded_attention=true: {why_not}; leave it at auto")
    return cfg.unpadded_attention is not False and why_not is None


def _wants_seen_rows(cfg: TrainConfig, accelerator) -> bool:
    if is_sharded(accelerator):  # the trained rows are a parameter of their own, outside FSDP's shards
        if cfg.seen_embedding_rows is True:
            raise TrainingSetupError("train.seen_embedding_rows=true does not work with FSDP sharding; "
                                     "leave it at auto")
        return False
    return cfg.seen_embedding_rows is True or (cfg.seen_embedding_rows == "auto" and accelerator.device.type == "cpu")


def _effective_batch(cfg: TrainConfig, accelerator) -> int:
    return cfg.batch_size * cfg.grad_accum * accelerator.num_processes


def _precision(accelerator) -> str:
    return "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
