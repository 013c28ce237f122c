"""Fine-tuning methods (full, head, and peft's LoRA / DoRA / LoRA+ / IA3 / any peft config).

Every method is built on peft; this module only decides which modules they touch, which
parameters train, and how they are saved and loaded back.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftlab.errors import MethodError
from peftlab.families import FAMILIES, family
from peftlab.method_configs import (
    FullMethod,
    HeadMethod,
    IA3Method,
    LoraMethod,
    LoraPlusMethod,
    PeftMethod,
)
from peftlab.peft_configs import peft_config_class

HEAD_WEIGHTS = "head_model.safetensors"

# --------------------------------------------------------------------------- modules


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules outside the pretrained encoder: the task head, always trained and saved."""
    prefix = model.base_model_prefix
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def linear_modules(model: nn.Module) -> list[str]:
    """Names of the encoder's linear layers (head and pooler excluded)."""
    prefix = model.base_model_prefix + "."
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefix) and ".pooler." not in name]


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """`attention` / `feedforward` / `all-linear` -> exact module names; explicit names are checked."""
    linear = linear_modules(model)
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
        if unknown:
            suffixes = sorted({n.split(".")[-1] for n in linear} | {".".join(n.split(".")[-2:]) for n in linear})
            raise MethodError(f"method.targets {unknown} match no linear layer of this model; "
                              f"names that exist: {', '.join(suffixes)}")
        return list(targets)
    if targets == "all-linear":
        return linear
    model_type = model.config.model_type
    known = family(model_type)
    if known is None:
        raise MethodError(f"method.targets={targets!r} is not known for model type {model_type!r}; "
                          f"use all-linear or list module names ({', '.join(sorted(FAMILIES))} are known)")
    pattern = re.compile(getattr(known, targets))
    return [name for name in linear if pattern.search(name)]


# --------------------------------------------------------------------------- building


def _lora_config(method: LoraMethod, model: nn.Module):
    from peft import LoraConfig, TaskType

    init: Any = True if method.init == "default" else method.init
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=method.r, lora_alpha=method.alpha,
                      lora_dropout=method.dropout, bias=method.bias, use_rslora=method.rslora,
                      use_dora=method.kind == "dora", init_lora_weights=init,
                      target_modules=resolve_targets(model, method.targets), modules_to_save=head_modules(model))


def _ia3_config(method: IA3Method, model: nn.Module):
    from peft import IA3Config, TaskType

    targets = resolve_targets(model, method.targets)
    if method.feedforward_targets is not None:
        feedforward = resolve_targets(model, method.feedforward_targets)
    elif family(model.config.model_type) is not None:
        ffn = set(resolve_targets(model, "feedforward"))
        feedforward = [t for t in targets if t in ffn]
    else:
        raise MethodError("method.feedforward_targets is needed for this architecture (list the feed-forward layers)")
    missing = [f for f in feedforward if not any(t == f or f.endswith("." + t) or t.endswith("." + f) for t in targets)]
    if missing:
        raise MethodError(f"method.feedforward_targets {missing} must also be in method.targets")
    return IA3Config(task_type=TaskType.SEQ_CLS, target_modules=targets, feedforward_modules=feedforward,
                     modules_to_save=head_modules(model))


def _generic_peft_config(method: PeftMethod, model: nn.Module):
    from peft import TaskType

    cls = peft_config_class(method.config)
    options = dict(method.options)
    fields = {f.name for f in dataclasses.fields(cls)}
    if "target_modules" in fields and isinstance(options.get("target_modules"), str) \
            and options["target_modules"] in ("attention", "feedforward", "all-linear"):
        options["target_modules"] = resolve_targets(model, options["target_modules"])
    if "modules_to_save" in fields and "modules_to_save" not in options:
        options["modules_to_save"] = head_modules(model)
    return cls(task_type=TaskType.SEQ_CLS, **options)


PEFT_CONFIG_BUILDERS: dict[type, Callable[[Any, nn.Module], Any]] = {
    LoraMethod: _lora_config, LoraPlusMethod: _lora_config, IA3Method: _ia3_config, PeftMethod: _generic_peft_config,
}


def apply_method(model: nn.Module, method) -> nn.Module:
    """Wrap or freeze `model` for the method; the head always trains."""
    if isinstance(method, FullMethod):
        model.requires_grad_(True)
        return model
    if isinstance(method, HeadMethod):
        model.requires_grad_(False)
        for name in head_modules(model):
            getattr(model, name).requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, PEFT_CONFIG_BUILDERS[type(method)](method, model))


def store_frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen nn.Linear weights in `dtype`, the autocast dtype of the run. Autocast casts
    every fp32 weight to it again at every matmul (an adapter run's base weights never change);
    stored cast once, they give the same numbers, less copying and half the memory. Returns how many
    layers were cast. Not for DoRA, which takes norms of the base weight outside autocast."""
    cast = 0
    for module in model.modules():
        if type(module) is nn.Linear and not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)
            cast += 1
    return cast


def is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# --------------------------------------------------------------------------- parameters


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters of the model as deployed (peft's frozen head copy excluded)."""
    trainable = total = 0
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}


def parameter_groups(model: nn.Module, method, lr: float, weight_decay: float,
                     head_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups, decided on purpose:

    - 1-D parameters (biases, LayerNorm, IA3 vectors, DoRA magnitudes) get no weight decay;
    - for LoRA+, only the 2-D `lora_B` matrices learn at lr * lr_ratio (peft's helper would also
      boost every 1-D parameter, the head's bias included);
    - the task head learns at `head_lr` where it is given (it starts from random, the encoder does not).
    """
    boosted_ratio = method.lr_ratio if isinstance(method, LoraPlusMethod) else None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    in_head = ({id(p) for name in head_modules(base) for p in getattr(base, name).parameters()}
               if head_lr is not None and head_lr != lr else set())
    decay, no_decay, boosted, head = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in in_head:
            head.append(param)
        elif boosted_ratio is not None and "lora_B" in name and param.ndim >= 2:
            boosted.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"}]
    if boosted:
        groups.append({"params": boosted, "lr": lr * boosted_ratio, "weight_decay": weight_decay, "name": "lora_B"})
    if head:
        groups.append({"params": head, "lr": head_lr, "weight_decay": weight_decay, "name": "head"})
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------- save / load


def save_trained(model: nn.Module, method, directory: Path, trained: dict[str, torch.Tensor] | None = None) -> None:
    """HF layouts: adapter_config.json + adapter_model.safetensors, or a full safetensors model.
    `trained`: the trained parameters gathered whole, where the model's own are shards (FSDP)."""
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(method, HeadMethod):
        from safetensors.torch import save_file

        heads = head_modules(model)
        if trained is None:
            trained = {k: v.detach() for name in heads for k, v in getattr(model, name).state_dict(prefix=f"{name}.").items()}
        state = {k: v.contiguous() for k, v in trained.items() if k.split(".")[0] in heads}
        save_file(state, str(directory / HEAD_WEIGHTS))
        model.config.save_pretrained(directory)
        return
    model.save_pretrained(directory, safe_serialization=True, **({"state_dict": trained} if trained else {}))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _pickled_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)) \
        if directory.is_dir() else []


def _require_safetensors(directory: Path, expected: tuple[str, ...], allow_pickle: bool) -> bool:
    """True when one of the `expected` safetensors files is there; otherwise refuse pickled weights
    (naming the file) unless `allow_pickle`, and say so when there are no weights at all. Returns False
    only when pickled weights are allowed and are what the directory holds."""
    from peftlab.models import ModelLoadError

    if any((directory / name).is_file() for name in expected):
        return True
    pickled = _pickled_files(directory)
    if pickled and not allow_pickle:
        raise ModelLoadError(
            f"{directory / pickled[0]}: pickled weights; peftlab loads safetensors only "
            f"(expected {expected[0]}) unless the run's config sets model.allow_pickle=true")
    if not pickled:
        raise ModelLoadError(f"{directory} holds no saved weights (expected {expected[0]})")
    return False


def load_trained(directory: Path, method, base_factory: Callable[[], nn.Module],
                 allow_pickle: bool = False) -> nn.Module:
    """Rebuild a saved model: base from `base_factory` plus the saved adapter / head / weights.

    Safetensors only: a directory whose weights are pickled (adapter_model.bin, pytorch_model.bin,
    a head in .bin/.pt) is refused before anything is unpickled, unless `allow_pickle` (the run's
    model.allow_pickle)."""
    directory = Path(directory)
    if isinstance(method, FullMethod):
        from peftlab.models import load_classifier

        _require_safetensors(directory, ("model.safetensors", "model.safetensors.index.json"), allow_pickle)
        return load_classifier(str(directory), allow_pickle=allow_pickle)
    if isinstance(method, HeadMethod):
        safe = _require_safetensors(directory, (HEAD_WEIGHTS,), allow_pickle)
        base = base_factory()
        if safe:
            from safetensors.torch import load_file

            source = directory / HEAD_WEIGHTS
            state = load_file(str(source))
        else:  # allowed by model.allow_pickle; tensors only all the same
            source = directory / _pickled_files(directory)[0]
            state = torch.load(source, map_location="cpu", weights_only=True)
        missing = [k for k in state if k not in base.state_dict()]
        if missing:
            raise MethodError(f"{source}: weights {missing[:3]} do not fit the base model")
        base.load_state_dict(state, strict=False)
        return base
    _require_safetensors(directory, ("adapter_model.safetensors",), allow_pickle)
    base = base_factory()
    import inspect

    from peft import PeftModel

    # A peft that takes use_safetensors is told so too; peft 0.21 does not take it, and loads the
    # adapter_model.safetensors checked above (it prefers it to a .bin beside it).
    takes = any("use_safetensors" in inspect.signature(f).parameters
                for f in (PeftModel.from_pretrained, PeftModel.load_adapter))
    extra = {"use_safetensors": True} if takes and not allow_pickle else {}
    return PeftModel.from_pretrained(base, str(directory), **extra)


def load_run_model(run) -> torch.nn.Module:
    """The saved classifier of a finished run, rebuilt on its base model."""
    from peftlab.models import load_base

    labels = dict(enumerate(run.labels))
    return load_trained(run.model_dir, run.config.method,
                        lambda: load_base(run.config.model, labels, run.config.data.task,
                                                          run.config.data.label_range),
                        allow_pickle=run.config.model.allow_pickle)
