"""`peftlab eval`: a finished run scored again, on its own eval split or on data given by overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftlab.batching import evaluation_loader
from peftlab.config_loading import apply_overrides, parse_overrides, validate_config
from peftlab.errors import DataError
from peftlab.evaluation import evaluate
from peftlab.methods import load_run_model
from peftlab.runs import load_run
from peftlab.speed.plan import inference_plan
from peftlab.tokens import prepare_data
from peftlab.training.accelerator import make_accelerator
from peftlab.training.console import precision


def evaluate_run(path: Path | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run on its own eval split (or one given by overrides), with the
    inference side of its speed plan."""
    run = load_run(path)
    config = run.config
    if overrides:
        raw = apply_overrides(config.model_dump(mode="json"), parse_overrides(overrides))
        config = validate_config(raw, origin=f"{run.path} + overrides")
    data = prepare_data(config)
    if data.splits.labels.names != run.labels:
        raise DataError(f"the data's labels {data.splits.labels.names} differ from the run's {run.labels}")
    accelerator = make_accelerator(config.train)
    model = load_run_model(run)
    plan = inference_plan(config.speed, accelerator.device, model.config.model_type, precision(accelerator))
    model = accelerator.prepare(model)
    pad_multiple = 8 if torch.cuda.is_available() else 1
    loader = accelerator.prepare(evaluation_loader(data.eval, data.tokenizer.pad_token_id, config.train.eval_batch_size,
                                                   config.train.seed, pad_multiple))
    return evaluate(model, loader, accelerator, run.labels, plan, config.data.task, config.data.thresholds,
                    config.data.calibration_fraction)
