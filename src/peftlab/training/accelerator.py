"""The accelerate `Accelerator` of a run: precision, processes, FSDP2 sharding."""

from __future__ import annotations

import torch

from peftlab.config import TrainConfig
from peftlab.errors import TrainingSetupError
from peftlab.speed import compat
from peftlab.training.sharding import (
    is_sharded,
    load_in_every_process,
    shard_on_cpu,
    sharding_requested,
)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DataLoaderConfiguration

    on_gpu = torch.cuda.is_available()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not on_gpu:
        raise TrainingSetupError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    compat.reset_accelerate_state()
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
