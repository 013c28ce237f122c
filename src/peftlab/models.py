"""Load pretrained encoders and tokenizers: safetensors only, no remote code, unless asked."""

from __future__ import annotations

import torch
from torch import nn

from peftlab.assets import resolve_model_name
from peftlab.config import ModelConfig
from peftlab.errors import ModelLoadError
from peftlab.tasks import PROBLEM_TYPES


def _quiet_transformers() -> None:
    # Its per-load weight report and bars would drown peftlab's own output; errors still show.
    import warnings

    import transformers

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_classifier(name_or_path: str, labels: dict[int, str] | None = None, dtype: str = "float32",
                    allow_pickle: bool = False, task: str | None = None, label_range=None) -> nn.Module:
    """A sequence classifier; with `labels`, a fresh head of that size and the label names."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    kwargs = {"dtype": getattr(torch, dtype), "use_safetensors": None if allow_pickle else True}
    if labels is not None:
        kwargs |= {"num_labels": len(labels), "id2label": dict(labels),
                   "label2id": {v: k for k, v in labels.items()}}
    if task is not None:  # the head's loss and what its outputs mean, saved in config.json
        kwargs["problem_type"] = PROBLEM_TYPES[task]
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        text = str(exc)
        if not allow_pickle and ("safetensors" in text or "model.safetensors" in text):
            raise ModelLoadError(
                f"model {name_or_path!r} has no safetensors weights; peftlab does not load pickled "
                f"(.bin) weights unless you set model.allow_pickle=true ({text.splitlines()[0]})"
            ) from None
        if "trust_remote_code" in text:
            raise ModelLoadError(f"model {name_or_path!r} needs remote code, which peftlab does not run") from None
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {text.splitlines()[0] if text else exc!r}") from None
    if label_range is not None:  # a regression's unit (data.label_range), saved in config.json
        model.config.label_range = [float(v) for v in label_range]
    return model


def model_config(name_or_path: str):
    """The model's transformers config from its config.json alone (no weights read); None where it
    cannot be read: loading the model then says why."""
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(resolve_model_name(name_or_path))
    except (OSError, ValueError):
        return None


def load_base(cfg: ModelConfig, labels: dict[int, str], task: str = "single_label", label_range=None) -> nn.Module:
    return load_classifier(resolve_model_name(cfg.name), labels, cfg.dtype, cfg.allow_pickle, task, label_range)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(name_or_path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"the tokenizer of {name_or_path!r} has no padding token")
    return tokenizer
