"""The `method:` section of a run config: one typed class per fine-tuning method, picked by `kind`
(methods.py builds them on peft)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, model_validator

from peftlab.typed_config import Strict

Targets = Union[Literal["attention", "feedforward", "all-linear"], list[str]]


class FullMethod(Strict):
    """Every weight is trained."""

    kind: Literal["full"] = "full"
    """Picks full fine-tuning."""


class HeadMethod(Strict):
    """Only the classification head is trained (a linear probe)."""

    kind: Literal["head"] = "head"
    """Picks training the head alone."""


class LoraMethod(Strict):
    """LoRA (and DoRA with `kind: dora`) through peft."""

    kind: Literal["lora", "dora"] = "lora"
    """Picks LoRA, or DoRA with `dora` (weight-decomposed LoRA: peft's `use_dora`)."""
    r: int = Field(8, ge=1)
    """Rank of the low-rank update."""
    alpha: float = Field(16.0, gt=0)
    """Scaling of the update (peft's `lora_alpha`): alpha/r, or alpha/sqrt(r) with `rslora`."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on the adapter's input (peft's `lora_dropout`)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train besides the adapter (peft's `bias`)."""
    rslora: bool = False
    """Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)."""
    init: Literal["default", "gaussian"] = "default"
    """Adapter initialisation (peft's `init_lora_weights`): `default` (A Kaiming-uniform, B zero) or `gaussian`
    (A Gaussian, B zero). peft's PiSSA / OLoRA are not offered: they rewrite base weights, which cannot yet be
    converted back with a trained head."""
    targets: Targets = "attention"
    """Module names, or `attention` / `feedforward` / `all-linear` resolved per architecture."""


class LoraPlusMethod(LoraMethod):
    """LoRA+: the B matrices learn `lr_ratio` times faster than A."""

    kind: Literal["loraplus"] = "loraplus"  # type: ignore[assignment]
    """Picks LoRA+."""
    lr_ratio: float = Field(16.0, gt=0)
    """The 2-D `lora_B` matrices learn at `train.lr` times this; every other weight at `train.lr`."""


class IA3Method(Strict):
    """IA3 through peft: learned vectors scale the outputs (or, for feed-forward layers, the inputs) of the
    targeted layers."""

    kind: Literal["ia3"] = "ia3"
    """Picks IA3."""
    targets: Targets = "all-linear"
    """Module names, or `attention` / `feedforward` / `all-linear` resolved per architecture."""
    feedforward_targets: Targets | None = None
    """Targets whose input (not output) is scaled; by default the architecture's feed-forward layers among `targets`."""


class PeftMethod(Strict):
    """Any other peft method, named by its config class (`VeraConfig`, `LoHaConfig`, ...)."""

    kind: Literal["peft"] = "peft"
    """Picks the peft method named by `config`."""
    config: str
    """Name of the peft config class, e.g. `LoHaConfig`, `VeraConfig`."""
    options: dict[str, Any] = {}
    """Its fields, checked against the class (`task_type` is peftlab's; `target_modules` may be a keyword of
    `targets`)."""

    @model_validator(mode="after")
    def _known_peft_config(self) -> "PeftMethod":
        from peftlab.peft_configs import check_peft_options

        check_peft_options(self.config, self.options)
        return self


MethodConfig = Annotated[
    Union[FullMethod, HeadMethod, LoraMethod, LoraPlusMethod, IA3Method, PeftMethod],
    Field(discriminator="kind"),
]
METHOD_CLASSES: dict[str, type[BaseModel]] = {
    "full": FullMethod, "head": HeadMethod, "lora": LoraMethod, "dora": LoraMethod,
    "loraplus": LoraPlusMethod, "ia3": IA3Method, "peft": PeftMethod,
}

# Adapters train a few fresh weights and need far higher rates than full fine-tuning; these are the
# rates that did best in peftlab's own studies on MiniLM + tweets (docs/recipes.md).
DEFAULT_LR = {"full": 5e-5, "head": 1e-3, "lora": 2e-3, "dora": 2e-3, "loraplus": 5e-4, "ia3": 1e-2, "peft": 1e-3}
