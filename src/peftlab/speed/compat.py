"""Every private API of torch, transformers and accelerate that peftlab's speed paths touch, in one
place. Each is probed once (`probe`); a path whose probe fails is planned off, visibly (the plan's
announcement and summary.json say why), instead of failing deep inside a step after an upgrade.
pyproject.toml bounds the versions these were tested with; scripts/check-newest.sh tries newer ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

# --------------------------------------------------------------------------- probes


@functools.cache
def attention_interface() -> str | None:
    """transformers' registries of attention functions and masks, and a model's switch between them;
    None when present, else what is missing."""
    try:
        from transformers import AttentionInterface, PreTrainedModel  # noqa: F401
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as error:
        return f"this transformers lacks its attention interface ({error})"
    if not hasattr(PreTrainedModel, "set_attn_implementation") or not hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return "this transformers cannot switch a model's attention function"
    return None


@functools.cache
def flash_varlen() -> str | None:
    """torch's variable-length flash attention op."""
    return None if hasattr(torch.ops.aten, "_flash_attention_forward") else "this torch lacks _flash_attention_forward"


@functools.cache
def fused_adamw_scaling() -> str | None:
    """Whether torch's fused AdamW takes `grad_scale` and `found_inf` (as GradScaler hands them over)."""
    try:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except (RuntimeError, TypeError) as error:
        return f"this torch has no fused AdamW here ({error})"
    return None if getattr(optimizer, "_step_supports_amp_scaling", False) else \
        "this torch's fused AdamW does not take grad_scale / found_inf"


@functools.cache
def onednn_bf16() -> str | None:
    """oneDNN's bf16 linear ops (weight prepacking) on this CPU."""
    try:
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
    except (AttributeError, RuntimeError):
        pass
    return "this torch build or CPU has no oneDNN bf16 linear ops"


@functools.cache
def compiler_stance() -> str | None:
    return None if hasattr(torch.compiler, "set_stance") else "this torch lacks torch.compiler.set_stance"


PROBES: dict[str, Callable[[], str | None]] = {
    "attention_interface": attention_interface, "flash_varlen": flash_varlen,
    "fused_adamw_scaling": fused_adamw_scaling, "onednn_bf16": onednn_bf16, "compiler_stance": compiler_stance,
}


def probe(name: str) -> str | None:
    """None when the private API `name` (a key of PROBES) works here, else why not."""
    return PROBES[name]()


# --------------------------------------------------------------------------- transformers


def attention_implementation(encoder) -> str | None:
    return getattr(getattr(encoder, "config", None), "_attn_implementation", None)


def install_attention(encoder, name: str, attention: Callable, make_mask: Callable) -> None:
    """Register `attention` and its mask builder under `name` and switch `encoder` to them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, make_mask)
    encoder.set_attn_implementation(name)


def restore_attention(encoder, name: str) -> None:
    encoder.set_attn_implementation(name)


def attention_function(name: str, default: Callable) -> Callable:
    """The attention function registered under `name` (transformers' ALL_ATTENTION_FUNCTIONS)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(name, default)


def sdpa_attention(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def sdpa_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask as make

    return make(*args, **kwargs)


# --------------------------------------------------------------------------- torch


def flash_varlen_forward(query, key, value, bounds, width: int, dropout: float, scale) -> torch.Tensor:
    """Flash attention over the segments `bounds` of flat [tokens, heads, head_dim] q, k, v."""
    return torch.ops.aten._flash_attention_forward(query, key, value, bounds, bounds, width, width, dropout, False,
                                                   False, scale=scale)[0]


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight in oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def for_next_step(optimizer, attribute: str, value: torch.Tensor) -> None:
    """Hand the fused optimizer `grad_scale` (it divides the gradients by it) or `found_inf` (it skips
    the step) for its next step only: the way torch's GradScaler does."""
    inner = torch_optimizer(optimizer)
    if not getattr(inner, "_peftlab_forgets", set()) >= {attribute}:
        inner.register_step_post_hook(lambda opt, args, kwargs: opt.__dict__.pop(attribute, None))
        inner._peftlab_forgets = getattr(inner, "_peftlab_forgets", set()) | {attribute}
    setattr(inner, attribute, value)


def run_eagerly():
    """Compiled modules run their original code op by op within the block."""
    return torch.compiler.set_stance("force_eager")


# --------------------------------------------------------------------------- accelerate


def reset_accelerate_state() -> None:
    """accelerate keeps the precision in a process-wide singleton that refuses a change; a study runs
    many runs in one process, each with its own. (The process group, in PartialState, stays.)"""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
