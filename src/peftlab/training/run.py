"""From a config to a trained, evaluated classifier in a finished run directory."""

from __future__ import annotations

import functools
import gc
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from peftlab import environment
from peftlab.batching import evaluation_loader, make_loader
from peftlab.config import SPEED_SWITCHES, RunConfig
from peftlab.errors import NonFiniteLossError, RunError
from peftlab.evaluation import evaluate
from peftlab.methods import (
    apply_method,
    count_parameters,
    parameter_groups,
    save_trained,
)
from peftlab.metrics import load_scorers
from peftlab.models import load_base, model_config
from peftlab.runs import CHECKPOINTS, LABELS, RunDir
from peftlab.speed import process_settings
from peftlab.speed.apply import apply_plan
from peftlab.speed.cuda_graphs import GRAPH_LENGTH_STEP, GraphedStep
from peftlab.speed.embedding_rows import follow_optimizer
from peftlab.speed.folded_clipping import gradient_clipper
from peftlab.speed.lagged_check import LaggedCheck
from peftlab.speed.plan import Setting, SpeedPlan, resolve
from peftlab.tokens import prepare_data
from peftlab.training.accelerator import make_accelerator
from peftlab.training.checkpoints import abandon_after, save_checkpoint
from peftlab.training.console import announce, run_summary, say
from peftlab.training.identity import check_identity, run_identity
from peftlab.training.loop import Hooks, Parts, Progress, fit
from peftlab.training.losses import check_against_labels, training_loss
from peftlab.training.resume import (
    StopOnSignal,
    TrainingInterrupted,
    checkpoint_to_resume,
    resume_from,
    shared_checkpoint,
)
from peftlab.training.sharding import gathered_optimizer, gathered_trainable, is_sharded
from peftlab.training.step import EagerStep
from peftlab.training.tracking import Trackers
from peftlab.windows import check_classifier


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
    sharded = is_sharded(accelerator)
    base_config = model_config(config.model.name)
    check_classifier(config.data.long_texts, config.model.name, base_config)
    plan = resolve(config.speed, Setting.of_run(config, accelerator, sharded, getattr(base_config, "model_type", None)))
    if plan.process_settings:
        process_settings.apply()
    run = RunDir.reserve(config.output, config.method.kind, resume) if accelerator.is_main_process else None
    if run:
        cleanup.callback(run.release)
    checkpoint = checkpoint_to_resume(run, config, resume) if run and resume else None
    checkpoint = shared_checkpoint(checkpoint, accelerator)
    with accelerator.main_process_first():  # the others read the tokens it caches
        data = prepare_data(config)
    names = data.splits.labels.names
    check_against_labels(config.train, names)
    # Hashing the base weights reads them all: only for a run that checkpoints or resumes.
    identity = functools.cache(lambda: run_identity(config, data))
    if run and checkpoint:
        check_identity(checkpoint, identity())
        for path in abandon_after(run.work / CHECKPOINTS, checkpoint.state["progress"]["step"]):
            say(f"peftlab: set aside the checkpoint after the one resumed from, as {path.name}")
    load_scorers()
    set_seed(config.train.seed)
    model = apply_method(load_base(config.model, data.splits.labels.id2label, config.data.task,
                                   config.data.label_range), config.method)
    counts = count_parameters(model)  # before the seen rows: all of the embedding matrix is trained
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    forced = {name for name in SPEED_SWITCHES if getattr(config.speed, name) is True}
    plan = apply_plan(plan, model, data.train.input_ids, autocast_dtype, forced)
    run = run.create(resuming=checkpoint is not None) if run else None
    announce(config, data, counts, run, accelerator, plan, sharded)
    trackers = Trackers(config, run.work, run.final.name) if run and config.output.report_to else None
    if trackers:
        cleanup.callback(trackers.close)  # a run that does not finish is marked failed; a finished one stays
    if run and not checkpoint:
        run.save_config(config)
        run.write_json(LABELS, {"labels": names, "id2label": data.splits.labels.id2label,
                                "label2id": data.splits.labels.label2id})
    parts = _training_parts(config, data, model, accelerator, plan)
    unwrapped = accelerator.unwrap_model(parts.model)

    def keep_best() -> None:
        if not config.output.save_model:
            return
        trained = gathered_trainable(parts.model) if sharded else None  # every process takes part
        if run:
            _refuse_non_finite(trained if sharded else _trained_parameters(unwrapped))
            run.save_model(lambda d: (save_trained(unwrapped, config.method, d, trained),
                                      data.tokenizer.save_pretrained(d)))

    def checkpoint_and_maybe_stop(progress: Progress) -> None:
        """Checkpoint; then, if a signal asked for it, stop with a message saying how to resume."""
        saved = None
        whole = (gathered_trainable(parts.model), gathered_optimizer(parts.model, parts.optimizer)) if sharded else None
        if run:
            _refuse_non_finite(whole[0] if whole else _trained_parameters(unwrapped))
            scaler = accelerator.scaler
            saved = save_checkpoint(run.work / CHECKPOINTS, unwrapped, parts.optimizer, parts.scheduler,
                                    {"progress": asdict(progress), "metrics_lines": run.log_lines(),
                                     "identity": identity(), "accumulation_step": accelerator.step,
                                     "grad_scaler": scaler.state_dict() if scaler else None},
                                    keep=config.train.keep_checkpoints, sharded=whole)
        if stop.agreed(accelerator):  # every process checkpoints here, so every process asks
            again = "resume=auto" if config.output.name or not run else f"resume=auto output.name={run.final.name}"
            raise TrainingInterrupted(stop.reason, f"stopped by {stop.reason} after step {progress.step}; "
                                      f"checkpoint {saved}; run the same command with {again} to go on")

    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    with StopOnSignal() as stop:
        hooks = Hooks(log=functools.partial(_log, run, trackers), keep_best=keep_best,
                      checkpoint=checkpoint_and_maybe_stop, stop_requested=lambda: stop.agreed(accelerator),
                      after_eval=after_eval)
        state = resume_from(checkpoint, unwrapped, parts.optimizer, parts.scheduler, accelerator, run, hooks) \
            if checkpoint else Progress()
        with plan.kernels(accelerator.device):
            state = fit(parts, config.train, hooks, state, show=config.output.progress)
    accelerator.wait_for_everyone()
    if run is None:
        return config.output.dir
    summary = run_summary(config, data, counts, state, started_at, accelerator) | {"run": run.final.name} \
        | plan.summary()
    if trackers:
        trackers.before_finish(summary)
    final = run.finish(summary)
    if trackers:
        trackers.finished(final)
    say(f"best {config.train.best_metric} {state.best[config.train.best_metric]:.4f} at epoch "
        f"{state.best['epoch']}; run saved to {final}")
    return final


def _log(run: RunDir | None, trackers: Trackers | None, record: dict) -> None:
    """A training or evaluation record to metrics.jsonl (the main process's), then to the trackers."""
    if run:
        run.log(record)
    if trackers:
        trackers.log(record)


def _training_parts(config: RunConfig, data, model, accelerator, plan: SpeedPlan) -> Parts:
    """The optimizer, scheduler, loaders and training step of a run, prepared by accelerate."""
    from transformers import get_scheduler

    cfg = config.train
    pad_multiple = 8 if torch.cuda.is_available() else 1
    train_loader = make_loader(data.train, cfg.batch_size, shuffle=True, group_by_length=cfg.group_by_length,
                               seed=cfg.seed, pad_id=data.tokenizer.pad_token_id,
                               pad_to_multiple_of=GRAPH_LENGTH_STEP if plan.cuda_graphs else pad_multiple,
                               max_width=config.model.max_length, balanced=config.data.sampler == "balanced",
                               max_per_document=config.data.max_chunks_per_doc)
    # The fused kernel updates all tensors in one pass, and takes folded clipping's scale.
    optimizer = torch.optim.AdamW(parameter_groups(model, config.method, cfg.lr, cfg.weight_decay,
                                                   config.head_learning_rate()),
                                  lr=cfg.lr,
                                  fused=True)
    follow_optimizer(model, optimizer)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(
        model, optimizer, train_loader,
        evaluation_loader(data.eval, data.tokenizer.pad_token_id, cfg.eval_batch_size, cfg.seed, pad_multiple))
    total_steps = min(math.ceil(len(train_loader) / cfg.grad_accum) * cfg.epochs, cfg.max_steps or math.inf)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round((cfg.warmup_ratio or 0.0) * total_steps)
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    names = data.splits.labels.names
    loss = training_loss(cfg, names, data.train.labels, config.data.task)
    step = (GraphedStep(model, optimizer, accelerator, params, warm_every_shape=plan.compile, loss_function=loss)
            if plan.cuda_graphs else EagerStep(model, optimizer, accelerator, loss))
    return Parts(model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
                 evaluation_loader=eval_loader, accelerator=accelerator, training_step=step,
                 evaluate=lambda: evaluate(model, eval_loader, accelerator, names, plan, config.data.task,
                                           config.data.thresholds, config.data.calibration_fraction),
                 clip=gradient_clipper(accelerator, optimizer, params, cfg.max_grad_norm, plan.folded_clipping)
                 if cfg.max_grad_norm else None,
                 lagged=LaggedCheck(optimizer) if plan.lagged_finiteness_check else None)


def _trained_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _refuse_non_finite(weights: dict[str, torch.Tensor]) -> None:
    for name, tensor in weights.items():
        if not torch.isfinite(tensor).all():
            raise NonFiniteLossError(f"parameter {name} became non-finite; nothing was saved from this step on")
