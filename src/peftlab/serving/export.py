"""`peftlab export`: a finished run as a plain transformers model (adapters merged), optionally ONNX."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from peftlab.errors import ExportError
from peftlab.runs import FinishedRun, is_empty_dir, load_run, replace_directory
from peftlab.tasks import METRICS

# Marks a directory as peftlab's export: the only thing besides an empty directory that an export
# may replace, and that only with --force.
EXPORT_MARKER = "peftlab_export.json"
EXPORT_FORMAT = "peftlab-export"


def merged_model(run: FinishedRun) -> torch.nn.Module:
    """The run's classifier with adapters folded into the base weights (a plain transformers model)."""
    from peftlab.methods import is_peft, load_run_model

    model = load_run_model(run)
    if is_peft(model):
        try:
            # safe_merge checks every merged weight for NaN/inf before replacing the original.
            model = model.merge_and_unload(safe_merge=True)
        except ValueError as exc:
            raise ExportError(f"cannot merge the adapter of {run.path}: {exc}") from None
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ExportError(f"{run.path}: weight {name} is not finite; nothing exported")
    return model.eval()


def fold_temperature(model: torch.nn.Module, temperature: list[float]) -> None:
    """Divide the head's output layer by the calibration temperature(s), so that the exported model's
    own softmax (or sigmoids) gives the calibrated probabilities."""
    from peftlab.methods import head_modules

    outputs = [m for name in head_modules(model) for m in getattr(model, name).modules()
               if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
    if not outputs:
        raise ExportError("cannot find the head's output layer to calibrate; export with --raw-scores")
    scale = 1.0 / torch.tensor(temperature, dtype=outputs[-1].weight.dtype)
    with torch.no_grad():
        outputs[-1].weight.mul_(scale[:, None])
        if outputs[-1].bias is not None:
            outputs[-1].bias.mul_(scale)


def keep_task_settings(config, run: FinishedRun, temperature: list[float] | None = None) -> None:
    """What answering needs besides the weights, into config.json: a multi-label run's tuned decision
    thresholds (`decision_thresholds`, label -> threshold, on the calibrated scale where the head was
    calibrated), a pair run's second column (`text_pair_column`) and the temperature folded into the head
    (`calibration_temperature`); `problem_type` and a regression's `label_range` are there already."""
    from peftlab.serving.inference import calibrated_thresholds

    thresholds = run.summary["best"].get("thresholds")
    if temperature is not None:
        config.calibration_temperature = temperature
        if thresholds is not None:
            thresholds = calibrated_thresholds(thresholds, temperature)
    if thresholds is not None:
        config.decision_thresholds = dict(zip(run.labels, thresholds))
    if run.config.data.text_pair_column:
        config.text_pair_column = run.config.data.text_pair_column


def is_export(path: Path) -> bool:
    """A directory (not a link) holding peftlab's export marker."""
    marker = Path(path) / EXPORT_MARKER
    if Path(path).is_symlink() or not Path(path).is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_export_target(out: Path, force: bool = False) -> None:
    """An export goes where nothing is, into an empty directory, or, with `force`, over an earlier
    export; anything else at `out` is refused and left as it is."""
    if not os.path.lexists(out) or is_empty_dir(out):
        return
    if not is_export(out):
        raise ExportError(f"{out} exists and is not a peftlab export; choose another directory (nothing was changed)")
    if not force:
        raise ExportError(f"{out} holds an earlier peftlab export; pass --force to replace it")


def export_run(path: Path | str, out: Path, onnx: bool = False, force: bool = False, raw: bool = False) -> Path:
    """Write `out/` (config.json with id2label/label2id, model.safetensors, tokenizer, README.md model
    card, peftlab_export.json, and model.onnx with `onnx`), built aside and swapped in whole. `out`
    must be free or empty; `force` replaces an earlier export there, never anything else."""
    from peftlab.models import load_tokenizer

    out = Path(out)
    check_export_target(out, force)  # before any work
    run = load_run(path)
    model = merged_model(run)
    temperature = None if raw else run.summary["best"].get("temperature")
    if temperature is not None:
        fold_temperature(model, temperature)
    keep_task_settings(model.config, run, temperature)
    tokenizer = load_tokenizer(str(run.model_dir))
    tokenizer.model_max_length = run.config.model.max_length  # what the model was trained on; serve reads it

    def build(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        (directory / "README.md").write_text(model_card(run, temperature), encoding="utf-8")
        if onnx:
            export_onnx(model, tokenizer, directory / "model.onnx", run.config.model.max_length)
        (directory / EXPORT_MARKER).write_text(json.dumps(
            {"format": EXPORT_FORMAT, "version": 1, "run": run.path.name,
             "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n", encoding="utf-8")
        check_export_target(out, force)  # again: nothing foreign appeared there meanwhile

    replace_directory(build, out)
    return out


def export_onnx(model: torch.nn.Module, tokenizer, path: Path, max_length: int) -> None:
    """torch's ONNX exporter with dynamic batch and sequence axes, then checked with onnxruntime:
    the exported graph must give the same probabilities as the model on sample texts."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxruntime: pip install 'peftlab[export]'") from None
    samples = ["a short one", "a somewhat longer text to check that padding and lengths vary " * 3]
    batch = tokenizer(samples, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    inputs = tuple(batch[k] for k in names)
    axes = {k: {0: "batch", 1: "sequence"} for k in names} | {"logits": {0: "batch"}}
    # SDPA's mask preparation branches on tensor values, which tracing would freeze to the sample's
    # shapes; eager attention traces into a graph that holds for any batch and length.
    model.set_attn_implementation("eager")
    wrapper = _LogitsOnly(model, names).eval()
    torch.onnx.export(wrapper, inputs, str(path), input_names=names, output_names=["logits"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    wrapper.eval()  # the exporter restores the wrapper's default (training) mode: dropout would be on
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {k: batch[k].numpy() for k in names})[0]
    with torch.inference_mode():
        want = wrapper(*inputs).numpy()
    if not np.allclose(got, want, atol=1e-4, rtol=1e-3) or not (got.argmax(-1) == want.argmax(-1)).all():
        raise ExportError(f"{path}: onnxruntime's logits differ from the model's (max diff "
                          f"{np.abs(got - want).max():.2e})")


class _LogitsOnly(torch.nn.Module):
    """Positional inputs in, logits out: the shape torch.onnx.export wants."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


def _answering(run: FinishedRun, temperature: list[float] | None) -> str:
    """How the logits become answers, where it is more than a softmax's best class."""
    data = run.config.data
    lines = []
    if temperature is not None:
        lines.append("Its probabilities are calibrated: the head's output layer is divided by the temperature "
                     "fitted on the evaluation split (`calibration_temperature` in config.json; ECE "
                     f"{run.summary['best'].get('ece', float('nan')):.3f} before, "
                     f"{run.summary['best'].get('ece_calibrated', float('nan')):.3f} after).")
    if data.task == "multi_label":
        lines.append("Multi-label: a sigmoid per label; a label is predicted at or above its threshold "
                     "(`decision_thresholds` in config.json, 0.5 where absent).")
    if data.task == "regression":
        unit = (f" The model learnt targets mapped from `label_range` {list(data.label_range)} onto 0-1: the "
                "answer is low + (high - low) x logit.") if data.label_range else ""
        lines.append(f"Regression: the one logit is the predicted value.{unit}")
    if data.text_pair_column:
        lines.append(f"Trained on text pairs (second text: `{data.text_pair_column}`): "
                     "`tokenizer(text, text_pair)`.")
    return "".join(f"\n{line}\n" for line in lines)


def model_card(run: FinishedRun, temperature: list[float] | None = None) -> str:
    summary, config = run.summary, run.config
    best = summary["best"]
    metrics = "\n".join(f"| {key} | {best[key]:.4f} |" for key in METRICS[config.data.task]
                        if isinstance(best.get(key), float))
    data = summary.get("data", {})
    return f"""---
library_name: transformers
pipeline_tag: text-classification
base_model: {config.model.name}
tags: [peftlab, {config.method.kind}]
---

# {run.path.name}

A text classifier fine-tuned with peftlab: method `{config.method.kind}` on `{config.model.name}`
({summary['trainable_params']:,} trainable parameters, {100 * summary['trainable_share']:.3f}% of
{summary['total_params']:,}), adapters merged into the weights. Labels: {', '.join(run.labels)}.
{_answering(run, temperature)}
Loads with plain transformers, no peft needed:

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained("<this directory>")
tokenizer = AutoTokenizer.from_pretrained("<this directory>")
```

## Evaluation

{data.get('n_eval')} evaluation examples, {data.get('n_train')} training examples; the kept checkpoint is the
best by {summary['best_metric']} (epoch {summary['best_epoch']}).

| metric | value |
|---|---|
{metrics}

## Training config

```yaml
{config.to_yaml()}```
"""
