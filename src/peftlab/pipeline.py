"""The steps a run and a re-evaluation share: data for a run, the accelerator, a saved model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.config import ModelConfig, RunConfig, TrainConfig, apply_overrides, parse_overrides, validate_config
from peftlab.data import Encoded, Splits, encode, make_loader, prepare_splits
from peftlab.models import load_base, load_tokenizer
from peftlab.sharding import is_sharded, load_in_every_process, shard_on_cpu, sharding_requested


class TrainingSetupError(ValueError):
    """A training setting this machine cannot honour (e.g. fp16 without a GPU)."""




@dataclass
class RunData:
    splits: Splits
    tokenizer: Any
    train: Encoded
    eval: Encoded

    def summary(self) -> dict[str, Any]:
        names = self.splits.labels.names
        return {"n_train": len(self.train), "n_eval": len(self.eval),
                "train_class_counts": dict(zip(names, np.bincount(self.train.labels, minlength=len(names)).tolist())),
                "eval_class_counts": dict(zip(names, np.bincount(self.eval.labels, minlength=len(names)).tolist())),
                "truncated_train": self.train.truncated, "truncated_eval": self.eval.truncated,
                "mean_train_tokens": float(self.train.lengths.mean()), **self.splits.notes}


def prepare_data(config: RunConfig) -> RunData:
    """Validate and tokenise both splits; every data error surfaces here, before any model loads."""
    splits = prepare_splits(config.data)
    tokenizer = load_tokenizer(config.model.name)
    cache = config.output.cache_dir
    train = encode(splits.train, splits.train_ids, tokenizer, config.model.max_length, cache)
    evaluation = encode(splits.eval, splits.eval_ids, tokenizer, config.model.max_length, cache)
    return RunData(splits, tokenizer, train, evaluation)


def run_identity(config: RunConfig, data: RunData) -> dict[str, Any]:
    """What decides a run's result beside its config, kept in its checkpoints so that a resume can
    refuse to go on where one of them changed: the examples as trained on (tokens and labels of both
    splits), the label names in order, and the content of the base model's files."""
    return {"data": data_fingerprint(data), "labels": list(data.splits.labels.names),
            "base_model": base_model_hash(config.model)}


def data_fingerprint(data: RunData) -> str:
    """sha256 of both splits as the model sees them: every text's token ids (and token types, which
    cover the tokenizer, data.max_length and the texts themselves) and its label id."""
    digest = hashlib.sha256()
    for split in (data.train, data.eval):
        lengths = split.lengths
        digest.update(f"|{len(split)}|".encode())
        digest.update(lengths.astype(np.int64).tobytes())
        digest.update(np.concatenate(split.input_ids).astype(np.int64).tobytes() if len(split) else b"")
        if split.token_type_ids is not None:
            digest.update(b"|types|" + (np.concatenate(split.token_type_ids).astype(np.int8).tobytes()
                                        if len(split) else b""))
        digest.update(b"|labels|" + np.asarray(split.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


BASE_MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "config.json")


def base_model_hash(cfg: ModelConfig) -> str | None:
    """sha256 of the base model's weight files and config.json (names, sizes, bytes): a local
    directory, the packaged alias, or a hub model's cached snapshot; None where no files are found."""
    from peftlab.assets import resolve_model_name

    directory = _model_directory(resolve_model_name(cfg.name))
    if directory is None:
        return None
    files = sorted({f for pattern in BASE_MODEL_FILES for f in directory.glob(pattern) if f.is_file()})
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"|{file.name}|{file.stat().st_size}|".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _model_directory(name: str) -> Path | None:
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a hub name, or no hub client: nothing to hash
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def eval_loader(data: RunData, cfg: TrainConfig, pad_multiple: int = 1):
    return make_loader(data.eval, cfg.eval_batch_size, shuffle=False, group_by_length=True, seed=cfg.seed,
                       pad_id=data.tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DataLoaderConfiguration

    on_gpu = torch.cuda.is_available()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not on_gpu:
        raise TrainingSetupError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    # accelerate keeps the precision in a process-wide singleton that refuses a change; a study runs
    # many runs in one process, each with its own. (The process group, in PartialState, stays.)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    if sharding_requested():
        load_in_every_process()
    # cpu=True on a machine without a GPU: under torchrun accelerate then runs data-parallel over gloo.
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision="no" if precision == "fp32" else precision,
                              gradient_accumulation_steps=cfg.grad_accum, step_scheduler_with_optimizer=False,
                              dataloader_config=DataLoaderConfiguration(non_blocking=on_gpu))
    if accelerator.distributed_type.name == "MULTI_CPU" and sharding_requested():
        shard_on_cpu(accelerator)
    if accelerator.distributed_type.name == "DEEPSPEED":
        raise TrainingSetupError("DeepSpeed is not supported; shard with FSDP2 (docs/scaling.md): "
                                 "accelerate launch --use_fsdp --fsdp_version 2 ...")
    if is_sharded(accelerator) and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise TrainingSetupError("peftlab shards with FSDP2: launch with --fsdp_version 2 "
                                 "(or fsdp_version: 2 in the accelerate config)")
    return accelerator


def load_run_model(run) -> torch.nn.Module:
    """The saved classifier of a finished run, rebuilt on its base model."""
    from peftlab.methods import load_trained

    labels = dict(enumerate(run.labels))
    return load_trained(run.model_dir, run.config.method, lambda: load_base(run.config.model, labels),
                        allow_pickle=run.config.model.allow_pickle)


def evaluate_run(path: Path | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run on its own eval split (or one given by overrides)."""
    from peftlab.evaluation import evaluate
    from peftlab.runs import load_run

    run = load_run(path)
    config = run.config
    if overrides:
        raw = apply_overrides(config.model_dump(mode="json"), parse_overrides(overrides))
        config = validate_config(raw, origin=f"{run.path} + overrides")
    data = prepare_data(config)
    if data.splits.labels.names != run.labels:
        raise ValueError(f"the data's labels {data.splits.labels.names} differ from the run's {run.labels}")
    accelerator = make_accelerator(config.train)
    model = accelerator.prepare(load_run_model(run))
    loader = accelerator.prepare(eval_loader(data, config.train, 8 if torch.cuda.is_available() else 1))
    return evaluate(model, loader, accelerator, run.labels)
