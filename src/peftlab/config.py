"""The typed run configuration: one validated object per concern (model, data, method, speed,
training, output), each field documented where it is declared (docs/config.md is generated from
these docstrings). Reading files and overrides is config_loading.py's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, field_validator, model_validator

from peftlab.data_config import DataConfig
from peftlab.method_configs import DEFAULT_LR, LoraMethod, MethodConfig
from peftlab.tasks import ALL_METRICS, DEFAULT_BEST_METRIC
from peftlab.tasks import METRICS as TASK_METRICS
from peftlab.typed_config import Strict

# --------------------------------------------------------------------------- model


class ModelConfig(Strict):
    """The pretrained encoder that is fine-tuned, with a classification head for the labels. Weights load from
    safetensors (pickled weights only with `allow_pickle`), and no remote code runs."""

    name: str = "minilm"
    """Hub model name (e.g. `distilbert-base-uncased`), local directory, or `minilm` (the packaged
    all-MiniLM-L6-v2)."""
    max_length: int = Field(128, ge=8, le=8192)
    """Texts are truncated to this many tokens."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (mixed precision is `train.precision`)."""
    allow_pickle: bool = False
    """Allow loading `pytorch_model.bin` (pickle) when a model has no safetensors."""


# --------------------------------------------------------------------------- speed

Switch = Union[bool, Literal["auto"]]


class SpeedConfig(Strict):
    """peftlab's speed paths (docs/performance.md). Each switch: `auto` takes the path where it is
    verified for this device, model family and method; `true` where it cannot run is an error, before
    the model loads; `false` is off. `speed: off` turns every path off: the plain reference path."""

    all: bool = True
    """`false` (or `speed: off`) turns every path off; a switch set to `true` beside it is an error."""
    fast_dropout: Switch = "auto"
    """Dropout masks from a faster CPU sampler (the same rate, another random stream), attention
    probabilities dropped by peftlab's own attention; `auto`: training on a CPU, uncompiled."""
    seen_embedding_rows: Switch = "auto"
    """Full fine-tuning: update only the input-embedding rows of tokens in the training data (the
    others' gradients are zero), sparing each step the whole vocabulary's update; `auto`: on a CPU,
    unsharded. Its steps are not recorded as CUDA graphs."""
    first_token_last_layer: Switch = "auto"
    """Compute the last encoder layer for the first token only, the one the classifier reads: the same
    logits and gradients; dropout draws smaller masks, so a seed gives another run. Families with a
    first-token head (families.py); `auto`: training on a CPU, uncompiled."""
    packed_tokens: Switch = "auto"
    """Train the encoder's layers on each batch's real tokens packed into one row, padding left out of
    their products, layer norms and dropout masks: the same logits and gradients up to summation
    order. On a CPU, through fast dropout's attention; `auto`: where fast_dropout is on and batches
    are random (`train.group_by_length: false`; length-grouped batches have too little padding)."""
    cast_frozen_linears: Switch = "auto"
    """Adapter methods under bf16/fp16 autocast: keep the frozen linear weights in that dtype (autocast
    casts them at every call otherwise); `auto`: unsharded runs of head, LoRA, LoRA+ and IA3."""
    packed_frozen_linears: Switch = "auto"
    """On a CPU in bf16, pack the frozen linear weights once into oneDNN's blocked layout (instead of at
    every call); needs cast_frozen_linears and oneDNN's bf16 ops; `auto`: where those are, uncompiled."""
    evaluation_packing: Switch = "auto"
    """Evaluation, predict and serve on a CPU run the encoder on real tokens only and the last layer for
    the first token only (the same logits up to summation order), and in bf16 with every linear weight
    packed for the evaluation; `auto`: on a CPU for the families with SDPA attention."""
    folded_clipping: Switch = "auto"
    """Gradient clipping folded into the fused AdamW step (the gradients are divided as the optimizer
    reads them; the same update up to rounding); `auto`: without fp16's loss scaler or FSDP."""
    lagged_finiteness_check: Switch = "auto"
    """Read whether a step's loss was finite one step later, the fused optimizer skipping a non-finite
    step itself, so that the host does not wait for the GPU every step; one unsharded process without
    fp16 and with `train.skip_nonfinite_steps: 0`; `auto`: on a CUDA GPU."""
    process_settings: Switch = "auto"
    """On a CPU, keep freed memory in the heap (glibc) and let oneDNN cache 8,192 compiled kernels;
    process-wide settings; `auto`: on a CPU."""
    planless_attention: Switch = "auto"
    """On a CUDA GPU, SDPA's flash and memory-efficient kernels instead of cuDNN's, which builds a plan
    for every new batch shape; `auto`: on a CUDA GPU."""
    cuda_graphs: Switch = "auto"
    """Replay each training step's forward and backward passes from CUDA graphs recorded once per batch
    shape (batches padded to lengths in steps of 64 tokens); `auto`: one process on a CUDA GPU in bf16
    or fp32, for the families and methods verified with graphs."""
    unpadded_attention: Switch = "auto"
    """Attention through flash attention's variable-length kernel, each text over its own tokens,
    instead of SDPA with a padding mask; `auto`: on a CUDA GPU of the Ampere generation or newer in
    bf16 or fp16, for families with SDPA attention."""
    compile: bool = False
    """Compile the encoder's repeated blocks with torch.compile (inductor, dynamic shapes; evaluation
    runs op by op): pays on long GPU runs only, once its compiling is paid for (see bench/RESULTS.md).
    Needs Triton on a GPU, a C++ compiler on a CPU."""

    @model_validator(mode="before")
    @classmethod
    def _on_or_off(cls, value: Any) -> Any:
        if value is False or value == "off":
            return {"all": False}
        if value is True or value in ("on", "auto"):
            return {}
        return value

    @model_validator(mode="after")
    def _nothing_on_when_all_off(self) -> "SpeedConfig":
        if not self.all:
            forced = [name for name in SPEED_SWITCHES if getattr(self, name) is True]
            if forced:
                raise ValueError(f"speed.all=false turns every path off; drop {', '.join('speed.' + n for n in forced)}")
        return self


SPEED_SWITCHES = tuple(name for name in SpeedConfig.model_fields if name != "all")


# --------------------------------------------------------------------------- training

DEFAULT_WARMUP_RATIO = 0.06  # as in the recipes of docs/recipes.md (and RoBERTa's fine-tuning)

# The head's learning rate that lets a multi-label head leave the label frequencies (docs/tasks.md).
MULTI_LABEL_HEAD_LR = 3e-3
METRICS = TASK_METRICS["single_label"]  # of the default task; each task's own: tasks.METRICS


class TrainConfig(Strict):
    """The optimisation: AdamW (no weight decay on 1-D parameters) with a warmed-up schedule, evaluation, the
    kept checkpoint and resumption."""

    epochs: int = Field(3, ge=1)
    """Passes over the training rows."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs when reached first)."""
    batch_size: int = Field(16, ge=1)
    """Training texts per batch, per process."""
    eval_batch_size: int = Field(64, ge=1)
    """Texts per evaluation batch."""
    grad_accum: int = Field(1, ge=1)
    """Batches whose gradients are accumulated into one optimizer step."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; default the method kind's own (listed below)."""
    head_lr: float | None = Field(None, gt=0)
    """Peak learning rate of the task head (the layers on top of the encoder, which start from random);
    default `lr`. Multi-label heads learn little more than each label's frequency at an encoder's learning
    rate: there the default is at least 3e-3 (docs/tasks.md)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay of the 2-D weights (biases, layer norms and other 1-D parameters get none)."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after the warm-up (linear and cosine decay to zero at the last step)."""
    warmup_steps: int | None = Field(None, ge=0)
    """Optimizer steps the learning rate warms up over; give this or `warmup_ratio`, not both."""
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """Share of the steps the learning rate warms up over; default 0.06 unless warmup_steps is given."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this; null disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision. `auto`: bf16 autocast on a GPU that has it, fp32 elsewhere. On a CPU that multiplies
    bf16 natively (Intel AMX, or AVX-512 BF16 as on AMD EPYC Zen 4: `lscpu` flags `amx_bf16`, `avx512_bf16`)
    `bf16` is faster, and an fp32 run there prints a hint (see bench/RESULTS.md)."""
    seed: int = 42
    """Seed of training (head initialisation, batch order, dropout); the data subsample has `data.seed`."""
    eval_every_steps: int | None = Field(None, ge=1)
    """Also evaluate every N optimizer steps (always after each epoch)."""
    log_every_steps: int = Field(10, ge=1)
    """Log the training loss, learning rate and throughput every N optimizer steps."""
    best_metric: Literal[ALL_METRICS] | None = None  # type: ignore[valid-type]
    """The saved model is the checkpoint best by this metric; default the task's own (`f1_macro`,
    multi-label `f1_micro`, regression `pearson`). Metrics per task: docs/tasks.md (`roc_auc` and
    `pr_auc`: two classes only)."""
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    """Weights of the classes in the training loss: `balanced` weighs each class by n / (classes x its
    count) (scikit-learn's rule), a mapping `{label: weight}` sets them (unnamed labels weigh 1); for a
    rare class that matters. The evaluation loss stays unweighted."""
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    """`focal`: the focal loss, cross-entropy scaled by (1 - p)^focal_gamma, so that examples the model
    already gets right weigh less (with class_weights as its alpha)."""
    focal_gamma: float = Field(2.0, ge=0)
    """The focal loss's focusing exponent (0 gives cross-entropy)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without improvement of `best_metric`."""
    group_by_length: bool = True
    """Batch texts of similar length together (seeded), so padding is small; `false`: random batches,
    as HF Trainer's (on a CPU trained on their real tokens only: speed.packed_tokens). Quality and speed of
    both: see bench/RESULTS.md."""
    num_threads: int | None = Field(None, ge=1)
    """torch CPU threads; default leaves torch's choice."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Also checkpoint every N optimizer steps (for `resume=auto` after a crash or pre-emption)."""
    checkpoint_each_epoch: bool = True
    """Checkpoint at the end of every epoch but the last."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept while the run is going; all are removed once it finishes (model/ holds the best)."""
    skip_nonfinite_steps: int = Field(0, ge=0)
    """Skip up to this many steps whose loss is NaN/inf (no update); one more stops the run."""

    @model_validator(mode="after")
    def _warmup(self) -> "TrainConfig":
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give train.warmup_steps or train.warmup_ratio, not both")
        if self.warmup_steps is None and self.warmup_ratio is None:
            self.warmup_ratio = DEFAULT_WARMUP_RATIO
        return self


# A run's name is one plain path component: the adapter-name rule of serving.py (a letter or digit,
# then letters, digits, '_', '.', '-'), plus '+' and up to 128 characters, as `peftlab study` names runs
# after their grid values (`lora_targetsq_lin+v_lin-seed42`). Matched with re.fullmatch: no `..`, no
# `/`, no absolute path, no trailing newline.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
UNFINISHED_SUFFIX = ".incomplete"


def run_name_problem(name: str) -> str | None:
    """None for a valid run name; else what is wrong with it."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        return (f"{name!r} is not a plain name: use letters, digits, '_', '-', '.' or '+', starting with a letter "
                "or digit (at most 128), no path separators")
    if name.endswith(UNFINISHED_SUFFIX):
        return f"{name!r} ends with {UNFINISHED_SUFFIX}, the suffix of unfinished runs"
    return None


class OutputConfig(Strict):
    """Where the run directory goes and what it keeps."""

    dir: Path = Path("runs")
    """Parent directory of run directories."""
    name: str | None = None
    """Run directory name, a plain name inside `dir` (letters, digits, `_ - . +`); default `<method>-<timestamp>`."""
    overwrite: bool = False
    """Replace an existing finished run of the same name (only once the new one finishes), and start
    afresh over the checkpoints of an unfinished one; never replaces what is not a peftlab run."""
    save_model: bool = True
    """Save the best model (adapter or weights, with the tokenizer) in the run directory."""
    progress: bool = True
    """Show progress bars."""
    cache_dir: Path | None = None
    """Token cache; default `$PEFTLAB_CACHE` or `~/.cache/peftlab`."""
    report_to: list[Literal["mlflow", "tensorboard"]] = []
    """Experiment trackers that also receive the run (docs/tracking.md): `mlflow` (the `mlflow` extra;
    `$MLFLOW_TRACKING_URI`, or a SQLite store `mlflow.db` in `dir`) and `tensorboard` (event files in
    the run directory). A tracker that fails is a warning; the run goes on."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        problem = None if name is None else run_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name


class RunConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    method: MethodConfig = LoraMethod()
    train: TrainConfig = TrainConfig()
    speed: SpeedConfig = SpeedConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _method_learning_rate(self) -> "RunConfig":
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR[self.method.kind]
        return self

    @model_validator(mode="after")
    def _task_settings(self) -> "RunConfig":
        task, train = self.data.task, self.train
        if train.best_metric is None:
            train.best_metric = DEFAULT_BEST_METRIC[task]
        if train.best_metric not in TASK_METRICS[task]:
            raise ValueError(f"train.best_metric={train.best_metric} is not a metric of data.task={task} "
                             f"(its metrics: {', '.join(TASK_METRICS[task])})")
        if task == "regression" and (train.class_weights != "none" or train.loss != "cross_entropy"):
            raise ValueError("train.class_weights and train.loss=focal weigh classes; data.task=regression has none")
        if task != "single_label" and self.data.sampler == "balanced":
            raise ValueError(f"data.sampler=balanced draws each class alike; it needs data.task=single_label, "
                             f"not {task}")
        return self

    @model_validator(mode="after")
    def _long_texts(self) -> "RunConfig":
        data, length = self.data, self.model.max_length
        if data.long_texts == "truncate":
            return self
        if data.text_pair_column is not None:
            raise ValueError(f"data.long_texts={data.long_texts} reads long single texts; "
                             "text pairs (data.text_pair_column) are cut as the tokenizer pairs them")
        if data.long_texts == "chunks":
            if data.stride is None:
                data.stride = length // 4
            if data.stride >= length - 2:
                raise ValueError(f"data.stride={data.stride} must be smaller than model.max_length={length} "
                                 "(less two special tokens): each window must move on")
        if data.long_texts == "head_tail":
            if data.head_tokens is None:
                data.head_tokens = (length - 2) // 4
            if data.head_tokens >= length - 2:
                raise ValueError(f"data.head_tokens={data.head_tokens} leaves no tail in model.max_length={length}")
        return self

    def head_learning_rate(self) -> float:
        """`train.head_lr`, or by default `lr` (multi-label: at least MULTI_LABEL_HEAD_LR)."""
        if self.train.head_lr is not None:
            return self.train.head_lr
        return max(self.train.lr, MULTI_LABEL_HEAD_LR) if self.data.task == "multi_label" else self.train.lr

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
