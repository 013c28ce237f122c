"""One SpeedPlan per run: every speed path decided once, from the `speed:` config, where the run
trains (device, processes, precision), the model family and the method; applied to the model in one
call; followed by evaluation, predict and serve alike. docs/performance.md describes the paths.

The rule for every switch: `auto` takes a path where it is verified for this combination, `true`
takes it or fails (every reason at once, before the model loads), `false` leaves it off. A path that
is off says why in the run's summary.json (`speed_paths_off`); one that a library's upgrade turned
off (speed/compat.py) is also announced as a warning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from peftlab.config import SPEED_SWITCHES, SpeedConfig
from peftlab.errors import TrainingSetupError
from peftlab.families import supports, with_feature
from peftlab.speed import compat
from peftlab.speed.attention import planless_attention
from peftlab.speed.cuda_graphs import VERIFIED_METHODS

# Methods whose frozen linear weights are only ever read by autocast matmuls (DoRA also takes their norms).
CAST_FROZEN_METHODS = {"head", "lora", "loraplus", "ia3"}


@dataclass(frozen=True)
class Setting:
    """Where and what a run trains: all a plan depends on besides the `speed:` config."""

    device: str = "cpu"  # "cpu" or "cuda"
    processes: int = 1
    sharded: bool = False
    precision: str = "fp32"  # "fp32", "bf16" or "fp16"
    model_type: str | None = None
    method: str = "lora"
    group_by_length: bool = True
    clipping: bool = True
    skip_nonfinite_steps: int = 0
    flash_capable: bool = False  # a CUDA GPU of the Ampere generation or newer

    @classmethod
    def of_run(cls, config, accelerator, sharded: bool, model_type: str | None) -> Setting:
        from peftlab.speed.unpadded_attention import flash_capable

        return cls(device=accelerator.device.type, processes=accelerator.num_processes, sharded=sharded,
                   precision="fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision,
                   model_type=model_type, method=config.method.kind, group_by_length=config.train.group_by_length,
                   clipping=config.train.max_grad_norm is not None,
                   skip_nonfinite_steps=config.train.skip_nonfinite_steps,
                   flash_capable=flash_capable(accelerator.device))


@dataclass(frozen=True)
class SpeedPlan:
    """Which speed paths a run takes (see SpeedConfig for each); `off` says why a path is not taken."""

    fast_dropout: bool = False
    seen_embedding_rows: bool = False
    first_token_last_layer: bool = False
    packed_tokens: bool = False
    cast_frozen_linears: bool = False
    packed_frozen_linears: bool = False
    evaluation_packing: bool = False
    folded_clipping: bool = False
    lagged_finiteness_check: bool = False
    process_settings: bool = False
    planless_attention: bool = False
    cuda_graphs: bool = False
    unpadded_attention: bool = False
    compile: bool = False
    off: dict[str, str] = field(default_factory=dict)
    bf16_inference: bool = False  # evaluation under bf16 autocast: its linear weights packed too (on a CPU)
    # filled in when applied to a model
    compiled_blocks: int = 0
    seen_rows: int | None = None  # input-embedding rows trained (speed.seen_embedding_rows) ...
    embedding_rows: int | None = None  # ... of the embedding's rows

    def taken(self) -> list[str]:
        return [name for name in PATHS if getattr(self, name)]

    def summary(self) -> dict[str, Any]:
        """summary.json's record of the plan: each path taken or not, why not, and what applying it did."""
        return {name: getattr(self, name) for name in PATHS} | {
            "speed_paths_off": dict(self.off), "compiled_blocks": self.compiled_blocks,
            "seen_embedding_rows": self.seen_rows}

    def describe(self) -> str:
        """One line of the paths taken, then one for each path an upgrade of a library turned off."""
        broken = {reason for name in compat.PROBES if (reason := compat.probe(name))}
        lines = ["speed paths: " + (", ".join(self.taken()) or "none (the reference path)")]
        lines += [f"warning: speed path {name} is off: {why}" for name, why in self.off.items() if why in broken]
        return "\n".join(lines)

    def kernels(self, device: torch.device | str):
        """The plan's choice of attention kernels, for any pass on `device`."""
        return planless_attention(device) if self.planless_attention else contextlib.nullcontext()

    @contextlib.contextmanager
    def packing(self, model: torch.nn.Module) -> Iterator[None]:
        """Inference of `model` on real tokens only, its last layer for the first token only, and in
        bf16 its linear weights packed (speed.evaluation_packing); once per pass, not per batch."""
        from peftlab.speed.packed_linear import packed_for_inference
        from peftlab.speed.packed_tokens import packed_tokens

        with contextlib.ExitStack() as stack:
            if self.evaluation_packing:
                if self.bf16_inference:
                    stack.enter_context(packed_for_inference(model))
                stack.enter_context(packed_tokens(getattr(model, "module", model)))  # inside DDP's wrapper
            yield

    @contextlib.contextmanager
    def inference(self, model: torch.nn.Module, device: torch.device | str) -> Iterator[None]:
        """Everything the plan does for a pass of inference (evaluation, predict, serve)."""
        from peftlab.speed.compiled_blocks import run_eagerly

        with self.kernels(device), run_eagerly() if self.compile else contextlib.nullcontext(), self.packing(model):
            yield


PATHS = SPEED_SWITCHES


def resolve(speed: SpeedConfig, where: Setting) -> SpeedPlan:
    """The plan for `where`. Raises TrainingSetupError listing every path set to `true` that cannot run."""
    family = where.model_type or "unknown"
    cpu, cuda = where.device == "cpu", where.device == "cuda"
    attention = compat.probe("attention_interface")
    sdpa_family = None if supports(where.model_type, "sdpa_attention") else (
        f"model type {family!r} is not a family with plain SDPA attention ({', '.join(with_feature('sdpa_attention'))})")
    decided: dict[str, bool] = {}
    off: dict[str, str] = {}
    refused: list[str] = []

    def decide(name: str, why_not: str | None, auto_why_not: str | None = None) -> bool:
        """`why_not`: the path cannot run here; `auto_why_not`: it could, but is not verified (or does
        not pay) here, so `auto` leaves it off."""
        setting = getattr(speed, name) if speed.all else False
        if setting is True and why_not:
            refused.append(f"speed.{name}=true: {why_not}")
        taken = why_not is None and (setting is True or (setting == "auto" and auto_why_not is None))
        if not speed.all:
            off[name] = "speed.all is false"
        elif setting is False:
            off[name] = f"speed.{name} is false"
        elif not taken:  # for `auto`, "not taken here" says more than "could not run"
            off[name] = (auto_why_not or why_not if setting == "auto" else why_not) or ""
        decided[name] = taken
        return taken

    compile_ = speed.compile and speed.all
    if compile_ and where.sharded:
        refused.append("speed.compile=true: it is not verified with FSDP sharding")
    if compile_ and compat.probe("compiler_stance"):  # evaluation runs compiled blocks eagerly through it
        refused.append(f"speed.compile=true: {compat.probe('compiler_stance')}")
    decided["compile"] = compile_
    if not compile_:
        off["compile"] = "speed.compile is false" if speed.all else "speed.all is false"

    decide("process_settings", None if cpu else "it sets a CPU process's allocator and oneDNN")
    decide("planless_attention", None if cuda else "it picks CUDA attention kernels")
    decide("fast_dropout", "it draws masks on a CPU" if not cpu
           else "speed.compile cannot trace its numpy masks" if compile_ else None)
    decide("first_token_last_layer",
           f"model type {family!r} has no first-token head it knows ({', '.join(with_feature('first_token_head'))})"
           if not supports(where.model_type, "first_token_head")
           else attention or ("it is untried with speed.compile" if compile_ else None),
           None if cpu else "it is verified on a CPU")
    decide("packed_tokens",
           "it packs on a CPU (untried on GPUs)" if not cpu
           else "it trains through fast dropout's attention, and speed.fast_dropout is off" if not decided["fast_dropout"]
           else sdpa_family or attention,
           "length-grouped batches (train.group_by_length) have too little padding to pay" if where.group_by_length
           else None)
    decide("seen_embedding_rows",
           "only full fine-tuning trains the embedding" if where.method != "full"
           else "its rows are a parameter outside FSDP's shards" if where.sharded
           else "CUDA graphs cannot record its host-side check of each batch" if speed.cuda_graphs is True else None,
           None if cpu else "it is verified on a CPU")
    decide("cast_frozen_linears",
           "it needs bf16 or fp16 autocast (train.precision)" if where.precision == "fp32"
           else f"method {where.method!r} trains its linear weights or reads them outside autocast" if where.method not in CAST_FROZEN_METHODS
           else "FSDP shards one dtype" if where.sharded else None)
    decide("packed_frozen_linears",
           "it needs speed.cast_frozen_linears on a CPU in bf16" if not (decided["cast_frozen_linears"] and cpu)
           else compat.probe("onednn_bf16") or ("it is untried with speed.compile" if compile_ else None))
    decide("evaluation_packing", None if cpu else "it packs on a CPU (untried on GPUs)")
    decide("folded_clipping",
           "there is no clipping (train.max_grad_norm is null)" if not where.clipping
           else "fp16's loss scaler unscales the gradients itself" if where.precision == "fp16" and cuda
           else "FSDP clips sharded gradients" if where.sharded else compat.probe("fused_adamw_scaling"))
    decide("lagged_finiteness_check",
           "it runs in one unsharded process" if where.processes > 1 or where.sharded
           else "train.skip_nonfinite_steps needs each step's verdict at once" if where.skip_nonfinite_steps
           else "fp16's loss scaler skips steps itself" if where.precision == "fp16"
           else compat.probe("fused_adamw_scaling"),
           None if cuda else "the host waits for nothing on a CPU")
    graphs_why_not = ("it needs a CUDA GPU" if not cuda
                      else "it runs in one process only" if where.processes > 1 or where.sharded
                      else "it does not combine with fp16's loss scaling; use bf16" if where.precision == "fp16"
                      else "it cannot record the seen embedding rows' host-side check"
                      if decided["seen_embedding_rows"] else None)
    verified = supports(where.model_type, "cuda_graphs_verified") and where.method in VERIFIED_METHODS
    decide("cuda_graphs", graphs_why_not,
           None if verified else f"model type {family!r} with method {where.method!r} is not verified with graphs")
    decide("unpadded_attention",
           "it needs a CUDA GPU of the Ampere generation or newer" if not where.flash_capable
           else "flash attention needs bf16 or fp16 (train.precision)" if where.precision == "fp32"
           else sdpa_family or attention or compat.probe("flash_varlen"))
    if refused:
        raise TrainingSetupError(f"{len(refused)} speed setting(s) cannot run here:\n  " + "\n  ".join(refused)
                                 + "\nleave them at auto, or set them to false")
    return SpeedPlan(**decided, off=off, bf16_inference=where.precision == "bf16")


def inference_plan(speed: SpeedConfig, device: torch.device | str, model_type: str | None,
                   precision: str = "fp32") -> SpeedPlan:
    """The inference side of a run's plan on `device` (predict, serve): its evaluation paths, with
    `true` read as `auto`, since the run may have trained on another device."""
    keep = ("evaluation_packing", "planless_attention")
    update: dict[str, Any] = {name: False for name in SPEED_SWITCHES if name not in keep}
    update |= {name: "auto" for name in keep if getattr(speed, name) is True}
    where = Setting(device=torch.device(device).type, model_type=model_type, precision=precision)
    return resolve(speed.model_copy(update=update), where)


def applied(plan: SpeedPlan, **changes) -> SpeedPlan:
    return replace(plan, **changes)
