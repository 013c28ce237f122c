"""Several trained adapters on one base model in memory, answering mixed batches of texts.

peft mixes LoRA adapters row by row in one forward pass (`adapter_names`), but its head dispatch
(`ModulesToSaveWrapper`) only takes a plain Linear head and one head shape. Classifiers trained on
different tasks have heads of different widths (3 sentiments, 4 topics) and RoBERTa's head is a
small network, so peftlab loads each adapter's head at its own shape and dispatches rows itself.
That is a GPU's way (`ServedModel.mix_rows`). On a CPU, whose products cost what their tokens cost,
each adapter's rows take a pass of their own over their real tokens alone (packed_tokens.py).
"""

from __future__ import annotations

import copy
import re
import types
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab import tasks
from peftlab.config import SpeedConfig
from peftlab.errors import ServeError
from peftlab.serving.inference import calibrated_thresholds
from peftlab.speed.plan import SpeedPlan, inference_plan
from peftlab.windows import Windowing

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Adapter:
    name: str
    source: str
    labels: list[str]
    max_length: int
    method: str
    mixable: bool  # served in mixed batches through peft's per-row adapter_names (LoRA without DoRA)
    # The name inside peft: peft warns that a name found in its weight prefixes ("a" is in "lora_")
    # may re-initialise weights on load, so users' names stay outside the model.
    key: str = "default"
    task: str = "single_label"  # what the head's outputs mean (tasks.py)
    thresholds: list[float] | None = None  # multi-label decision thresholds kept with the run
    label_range: list[float] | None = None  # a regression's unit (data.label_range)
    pairs: bool = False  # trained on text pairs (data.text_pair_column): takes pairs only
    temperature: list[float] | None = None  # calibration fitted with the kept checkpoint (calibration.py)
    windowing: Windowing | None = None  # a run that read long texts as head and tail, or in chunks

    @classmethod
    def of_run(cls, name: str, run, key: str = "default", mixable: bool = False) -> "Adapter":
        """A run's adapter as served: calibrated probabilities, multi-label thresholds on their scale."""
        best = run.summary["best"]
        temperature, thresholds = best.get("temperature"), best.get("thresholds")
        if temperature is not None and thresholds is not None:
            thresholds = calibrated_thresholds(thresholds, temperature)
        return cls(name, str(run.path), run.labels, run.config.model.max_length, run.config.method.kind, mixable, key,
                   run.config.data.task, thresholds, run.config.data.label_range,
                   run.config.data.text_pair_column is not None, temperature,
                   Windowing.of(run.config) if run.config.data.long_texts != "truncate" else None)


@dataclass
class ServedModel:
    model: nn.Module
    tokenizer: Any
    adapters: dict[str, Adapter]
    base: str
    device: torch.device
    peft: bool
    mix_rows: bool | None = None
    """Give rows of different LoRA adapters one pass (peft's per-row `adapter_names`); None: on a GPU
    only. On a CPU a pass per adapter on its texts' real tokens alone answered more texts/s than a
    mixed, padded pass (bench/RESULTS.md), with the same answers."""
    plan: SpeedPlan | None = None
    """The inference side of the (first) run's speed plan on this device."""

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = inference_plan(SpeedConfig(), self.device, getattr(self.model.config, "model_type", None))

    @classmethod
    def from_adapters(cls, specs: list[tuple[str, Path]], base: str | None = None,
                      device: str | None = None) -> "ServedModel":
        """Load the runs' adapters onto one copy of their shared base model."""
        from peft import PeftModel

        from peftlab.assets import resolve_model_name
        from peftlab.models import load_base, load_tokenizer
        from peftlab.runs import load_run

        if not specs:
            raise ServeError("name at least one adapter (--adapter NAME=RUN) or a model (--model PATH)")
        runs = {}
        for name, path in specs:
            _check_name(name, runs)
            run = load_run(path)
            if run.config.method.kind in ("full", "head"):
                raise ServeError(f"adapter {name!r}: {path} is a {run.config.method.kind} run with no adapter; "
                                 "serve it alone with --model")
            if not (run.model_dir / "adapter_model.safetensors").is_file():
                raise ServeError(f"adapter {name!r}: {run.model_dir} has no adapter_model.safetensors "
                                 "(peftlab does not load pickled weights)")
            runs[name] = run
        want = _same_model(resolve_model_name(base)) if base else None
        for name, run in runs.items():
            have = _same_model(resolve_model_name(run.config.model.name))
            want = want or have
            if have != want:
                raise ServeError(f"adapter {name!r} ({run.path}) was trained on {run.config.model.name!r}, "
                                 f"not on the served base {base or next(iter(runs.values())).config.model.name!r}")
        _check_one_peft_type(runs)
        keys = {name: f"served_{i}" for i, name in enumerate(runs)}
        first_name, first = next(iter(runs.items()))
        model = PeftModel.from_pretrained(load_base(first.config.model, dict(enumerate(first.labels))),
                                          str(first.model_dir), adapter_name=keys[first_name])
        for name, run in list(runs.items())[1:]:
            # Heads of another width are skipped here (peft warns) and installed at their own shape below.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ignore_mismatched_sizes.*")
                model.load_adapter(str(run.model_dir), adapter_name=keys[name], ignore_mismatched_sizes=True)
            _install_heads(model, keys[name], run.model_dir)
        _route_heads_by_row(model)
        adapters = {name: Adapter.of_run(name, run, keys[name], _mixable(model, keys[name]))
                    for name, run in runs.items()}
        target = _device(device)
        plan = inference_plan(first.config.speed, target, model.config.model_type)
        return cls(model.to(target).eval(), load_tokenizer(str(first.model_dir)), adapters,
                   str(first.config.model.name), target, peft=True, plan=plan)

    @classmethod
    def from_model(cls, path: Path, name: str = "default", max_length: int | None = None,
                   device: str | None = None) -> "ServedModel":
        """One classifier: a finished run of any method, or a merged export (`peftlab export --merged`)."""
        from peftlab.models import load_classifier, load_tokenizer
        from peftlab.runs import is_finished, load_run

        _check_name(name, {})
        path = Path(path)
        target = _device(device)
        if is_finished(path):
            from peftlab.methods import load_run_model

            run = load_run(path)
            model, tokenizer = load_run_model(run), load_tokenizer(str(run.model_dir))
            adapter = Adapter.of_run(name, run)
            base, speed = run.config.model.name, run.config.speed
        elif (path / "config.json").is_file():
            model, tokenizer = load_classifier(str(path)), load_tokenizer(str(path))
            labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
            length = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
            base, speed = path.name, SpeedConfig()
            kept = getattr(model.config, "decision_thresholds", None)  # serving.export.keep_task_settings
            # An export's head already divides by its temperature (or it was exported raw).
            adapter = Adapter(name, str(path), labels, length, "merged", mixable=False,
                              task=tasks.TASK_OF_PROBLEM.get(model.config.problem_type, "single_label"),
                              thresholds=[kept[label] for label in labels] if kept else None,
                              label_range=getattr(model.config, "label_range", None),
                              pairs=bool(getattr(model.config, "text_pair_column", None)))
        else:
            raise ServeError(f"{path} is neither a finished run nor a model directory with config.json")
        if max_length:
            adapter = replace(adapter, max_length=max_length)
        from peftlab.methods import is_peft

        plan = inference_plan(speed, target, model.config.model_type)
        return cls(model.to(target).eval(), tokenizer, {name: adapter}, base, target, peft=is_peft(model), plan=plan)

    def probabilities(self, ids: list[list[int]], adapters: list[str]) -> list[np.ndarray]:
        """What row i's adapter `adapters[i]` answers of it (`scores` of its `logits`)."""
        return [self.scores(a, row[None])[0] for row, a in zip(self.logits(ids, adapters), adapters)]

    def scores(self, adapter: str, logits: np.ndarray) -> np.ndarray:
        """An adapter's answers from its head's logits (texts x labels): probabilities, calibrated with
        its run's temperature, or a regression's values in their unit."""
        served = self.adapters[adapter]
        if served.temperature is not None:
            logits = logits / np.asarray(served.temperature, dtype=np.float32)
        return tasks.outputs(served.task, logits, served.label_range)

    @torch.inference_mode()
    def logits(self, ids: list[list[int]], adapters: list[str]) -> list[np.ndarray]:
        """The head's logits of each row of one padded batch, row i through adapter `adapters[i]` (each
        row's array has that adapter's number of labels). Logits, not probabilities: the windows of a
        chunked text combine before the softmax, as in evaluation (windows.combine)."""
        with self.plan.kernels(self.device):
            return self._logits(ids, adapters)

    def _logits(self, ids: list[list[int]], adapters: list[str]) -> list[np.ndarray]:
        from peftlab.serving.inference import padded_inputs

        inputs = padded_inputs(self.tokenizer, ids, self.device, self._token_types(ids, adapters))
        out: list[np.ndarray] = [np.empty(0)] * len(ids)

        def answer(rows: list[int], logits: torch.Tensor) -> None:
            for row, values in zip(rows, logits.float().cpu().numpy()):
                out[row] = values[: len(self.adapters[adapters[row]].labels)]  # mixed passes pad other heads

        groups = self._groups(adapters)
        for rows, adapter_names in groups:
            if adapter_names is not None:  # peft splits these by row: no packed tokens
                sub = {k: v[rows] for k, v in inputs.items()}
                answer(rows, self.model(**sub, adapter_names=[self.adapters[a].key for a in adapter_names]).logits)
        # One adapter a pass: on a CPU its layers run on the real tokens only (speed.evaluation_packing)
        with self.plan.packing(self.model):
            for rows, adapter_names in groups:
                if adapter_names is None:
                    if self.peft and self.model.active_adapter != (key := self.adapters[adapters[rows[0]]].key):
                        self.model.set_adapter(key)
                    answer(rows, self.model(**{k: v[rows] for k, v in inputs.items()}).logits)
        return out

    def _token_types(self, ids: list[list[int]], adapters: list[str]) -> list[list[int]] | None:
        """Token types of the rows of pair adapters, where the model takes them: 0 up to the first
        separator, 1 after it (as the tokenizer pairs them); other rows are all 0, as without types."""
        if "token_type_ids" not in self.tokenizer.model_input_names or not any(
                self.adapters[a].pairs for a in set(adapters)):
            return None
        sep = self.tokenizer.sep_token_id
        return [[0] * (row.index(sep) + 1) + [1] * (len(row) - row.index(sep) - 1)
                if self.adapters[a].pairs and sep in row else [0] * len(row) for row, a in zip(ids, adapters)]

    def _groups(self, adapters: list[str]) -> list[tuple[list[int], list[str] | None]]:
        """Where rows are mixed (`mix_rows`), the rows of two or more mixable adapters go in one pass
        with peft's per-row `adapter_names`; every other adapter gets a pass of its own (None)."""
        mix = self.device.type != "cpu" if self.mix_rows is None else self.mix_rows
        mixable = {a for a in adapters if mix and self.adapters[a].mixable}
        mixable = mixable if len(mixable) > 1 else set()
        groups: list[tuple[list[int], list[str] | None]] = []
        if mixable:
            rows = [i for i, a in enumerate(adapters) if a in mixable]
            groups.append((rows, [adapters[i] for i in rows]))
        for name in dict.fromkeys(a for a in adapters if a not in mixable):
            groups.append(([i for i, a in enumerate(adapters) if a == name], None))
        return groups

    def info(self) -> dict[str, Any]:
        return {"base": self.base, "device": str(self.device),
                # the run's name, not its path: clients need not learn the server's file system
                "adapters": {a.name: {"labels": a.labels, "max_length": a.max_length, "method": a.method,
                                      "run": Path(a.source).name, "mixed_batches": a.mixable,
                                      "task": a.task, "text_pairs": a.pairs,
                                      "long_texts": a.windowing.mode if a.windowing else "truncate"}
                             for a in self.adapters.values()}}


def _check_name(name: str, taken: dict) -> None:
    # fullmatch: with match, "$" also matches before a final newline and "abc\n" would pass
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ServeError(f"adapter name {name!r}: use letters, digits, '_', '-' or '.', starting with a letter "
                         "or digit (at most 64)")
    if name in taken:
        raise ServeError(f"adapter name {name!r} is given twice")


def _check_one_peft_type(runs: dict) -> None:
    """peft holds adapters of one type on a model (LoRA and DoRA are one type; IA3 another)."""
    from peft import PeftConfig

    types_ = {name: PeftConfig.from_pretrained(str(run.model_dir)).peft_type for name, run in runs.items()}
    if len(set(types_.values())) > 1:
        listed = ", ".join(f"{name} ({str(kind).split('.')[-1]})" for name, kind in types_.items())
        raise ServeError(f"adapters of different PEFT types cannot share one base model: {listed}; "
                         "start one server per type")


def _same_model(name: str) -> str:
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _head_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.utils import ModulesToSaveWrapper

    return {name: module for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)}


def _install_heads(model: nn.Module, adapter: str, directory: Path) -> None:
    """Give `adapter` its own copy of each head, shaped as saved (the final Linear's width may differ)."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / "adapter_model.safetensors"))
    for path, wrapper in _head_wrappers(model).items():
        prefix = path.removeprefix("base_model.model.") + "."
        state = {k.split(prefix, 1)[1]: v for k, v in saved.items() if prefix in k and ".lora_" not in k}
        if not state:
            continue
        head = copy.deepcopy(wrapper.original_module)
        for key, tensor in state.items():
            owner_name, _, param = key.rpartition(".")
            owner = head.get_submodule(owner_name) if owner_name else head
            if getattr(owner, param).shape != tensor.shape:
                if not isinstance(owner, nn.Linear) or tensor.dim() > 2:
                    raise ServeError(f"{directory}: head weight {key} has shape {tuple(tensor.shape)}, which "
                                     f"does not fit the base model's {tuple(getattr(owner, param).shape)}")
                resized = nn.Linear(owner.in_features, tensor.shape[0], bias=owner.bias is not None)
                if owner_name:
                    head.set_submodule(owner_name, resized)
                else:
                    head = resized
        head.load_state_dict(state, strict=True)
        wrapper.modules_to_save[adapter] = head.to(next(wrapper.original_module.parameters()).dtype)


def _route_heads_by_row(model: nn.Module) -> None:
    for wrapper in _head_wrappers(model).values():
        wrapper._mixed_batch_forward = types.MethodType(_mixed_head_forward, wrapper)


def _mixed_head_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
    """Each row through its adapter's head, whatever the head's type; narrower outputs are padded with
    -inf on the last axis (softmax gives those columns 0) so that the batch stacks into one tensor."""
    outputs: dict[str, tuple[list[int], torch.Tensor]] = {}
    for name in dict.fromkeys(adapter_names):
        rows = [i for i, a in enumerate(adapter_names) if a == name]
        outputs[name] = (rows, self.modules_to_save[name](x[rows], *args, **kwargs))
    width = max(out.shape[-1] for _, out in outputs.values())
    first = next(iter(outputs.values()))[1]
    result = first.new_full((len(adapter_names), *first.shape[1:-1], width), float("-inf"))
    for rows, out in outputs.values():
        result[rows, ..., : out.shape[-1]] = out
    return result


def _mixable(model: nn.Module, adapter: str) -> bool:
    from peft import LoraConfig

    config = model.peft_config[adapter]
    return isinstance(config, LoraConfig) and not config.use_dora
