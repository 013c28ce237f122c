"""Weights and optimizer state of a model sharded with FSDP2, gathered whole and loaded back.

Under FSDP each process holds a shard of every parameter and of its optimizer state. peftlab's
checkpoints and saved models hold whole tensors, in the same files and layout as without sharding:
every process takes part in the gather, the main one receives the tensors and writes them. torch's
distributed state-dict helpers do the gathering and the re-sharding.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def sharding_requested() -> bool:
    """`accelerate launch --use_fsdp` (or an accelerate config with FSDP) asked for sharding."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def load_in_every_process() -> None:
    """Before the Accelerator and the model are made: every process loads the whole model, as it does
    unsharded. accelerate's RAM-efficient loading (the main process loads, the others get empty
    weights filled at `prepare`) maps the optimizer's parameters to their shards by storage address,
    and here it swapped two of the classifier's parameters in one process (its weight replaced by
    its bias, so the weight never trained); peftlab keeps it off."""
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def shard_on_cpu(accelerator) -> None:
    """accelerate shards only on accelerators; torch's FSDP2 also runs over CPU processes (gloo), so
    on a machine without GPU an FSDP launch gets the same sharding rather than plain data parallelism."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # Both process-wide states: AcceleratorState copies PartialState's type whenever it is built again.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gathered_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole trained parameters by name, on the CPU of the main process (empty elsewhere).
    Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))


def _numbered_names(model: torch.nn.Module, optimizer) -> list[str]:
    """Parameter names in the optimizer's order, the numbering of `torch.optim` state dicts."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gathered_optimizer(model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's whole state in `torch.optim` layout, on the main process (empty elsewhere).
    Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    number = {name: i for i, name in enumerate(_numbered_names(model, optimizer))}
    return {"state": {number[name]: values for name, values in by_name["state"].items()},
            "param_groups": [group | {"params": [number[n] for n in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_whole_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Whole tensors (every process has read them) into this process's shards of those parameters."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))


def load_whole_optimizer(model: torch.nn.Module, optimizer, state_dict: dict[str, Any]) -> None:
    """An optimizer state dict in `torch.optim` layout into this process's shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    name_of = dict(enumerate(_numbered_names(model, optimizer)))
    by_name = {"state": {name_of[i]: values for i, values in state_dict["state"].items()},
               "param_groups": [group | {"params": [name_of[i] for i in group["params"]]}
                                for group in state_dict["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
