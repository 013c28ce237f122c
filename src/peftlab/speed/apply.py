"""A SpeedPlan applied to a model, in one call."""

from __future__ import annotations

from dataclasses import replace

import torch

from peftlab.errors import TrainingSetupError
from peftlab.methods import store_frozen_linears_in
from peftlab.speed.compiled_blocks import compile_blocks
from peftlab.speed.embedding_rows import train_seen_rows_only
from peftlab.speed.fast_dropout import use_fast_dropout
from peftlab.speed.first_token import compute_first_token_only
from peftlab.speed.packed_linear import pack_frozen_linears
from peftlab.speed.packed_tokens import pack_tokens_to_train
from peftlab.speed.plan import SpeedPlan
from peftlab.speed.unpadded_attention import use_unpadded_attention


def apply_plan(plan: SpeedPlan, model: torch.nn.Module, train_token_ids, autocast_dtype: torch.dtype | None,
               forced: set[str]) -> SpeedPlan:
    """Change `model` (on the CPU still, before accelerate prepares it) as `plan` says (its process
    settings are applied earlier, before anything is computed: speed.process_settings); returns the
    plan as taken. A path the model turned out not to fit (its layout, a tied embedding) is off in
    the result, with the reason; where it was set to `true` (`forced`), that is an error."""
    off: dict[str, str] = {}

    def took(name: str, done: bool, why_not: str) -> bool:
        if getattr(plan, name) and not done:
            if name in forced:
                raise TrainingSetupError(f"speed.{name}=true: {why_not}; leave it at auto")
            off[name] = why_not
        return getattr(plan, name) and done

    if plan.fast_dropout:
        use_fast_dropout(model)
    taken = {
        "unpadded_attention": took("unpadded_attention", plan.unpadded_attention and use_unpadded_attention(model),
                                   "the model's attention is not one it replaces"),
        "first_token_last_layer": took("first_token_last_layer",
                                       plan.first_token_last_layer and compute_first_token_only(model),
                                       "the model's last layer is not laid out as it expects"),
        "packed_tokens": took("packed_tokens", plan.packed_tokens and pack_tokens_to_train(model),
                              "the model's attention is not one it replaces"),
    }
    if plan.cast_frozen_linears:
        store_frozen_linears_in(model, autocast_dtype)
    if plan.packed_frozen_linears:
        pack_frozen_linears(model)  # only frozen bf16 layers, with oneDNN's bf16 ops
    compiled = compile_blocks(model) if plan.compile else 0  # compiles at the first step
    seen = train_seen_rows_only(model, train_token_ids) if plan.seen_embedding_rows else None
    taken["seen_embedding_rows"] = took("seen_embedding_rows", seen is not None,
                                        "the model's input embedding is tied, frozen or scales its gradient")
    return replace(plan, **taken, off=plan.off | off, compiled_blocks=compiled,
                   seen_rows=len(seen.seen_ids) if seen is not None else None,
                   embedding_rows=seen.num_embeddings if seen is not None else None)
