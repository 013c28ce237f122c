"""Typed, validated run configuration: YAML file + dotted ``key=value`` overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message lists every bad key at once."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model


class ModelConfig(_Strict):
    name: str = "minilm"
    """Hub model name, local directory, or `minilm` (the packaged all-MiniLM-L6-v2)."""
    max_length: int = Field(128, ge=8, le=8192)
    """Texts are truncated to this many tokens."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (mixed precision is `train.precision`)."""
    allow_pickle: bool = False
    """Allow loading `pytorch_model.bin` (pickle) when a model has no safetensors."""


# --------------------------------------------------------------------------- data


class DataConfig(_Strict):
    source: str | None = None
    """Hub dataset name (`imdb`, `ag_news`) or offline alias `tweets`; or leave empty and give files."""
    hub_config: str | None = None
    """Hub dataset configuration (subset) name."""
    train_file: Path | None = None
    """Local csv / jsonl / parquet file with training rows."""
    eval_file: Path | None = None
    """Local file with evaluation rows; without it `eval_fraction` of the training rows is held out."""
    train_split: str = "train"
    eval_split: str | None = "test"
    """Hub split used for evaluation; null holds out `eval_fraction` of the train split."""
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    text_column: str | None = None
    """Defaults to the source's own text column (`text` for files)."""
    text_pair_column: str | None = None
    """Second text of a pair (e.g. NLI hypothesis)."""
    label_column: str | None = None
    """Defaults to the source's own label column (`label` for files)."""
    labels: list[str] | None = None
    """Fixed label order; by default the sorted labels seen in training."""
    encoding: str = "utf-8"
    """Text encoding of csv / jsonl files (e.g. latin-1)."""
    n_train: int | None = Field(None, ge=1)
    """Stratified, seeded subsample of the training rows."""
    n_eval: int | None = Field(None, ge=1)
    seed: int = 42
    """Seed of subsampling and held-out splits (kept apart from `train.seed`, so seeds vary only training)."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.source is None and self.train_file is None:
            raise ValueError("give data.source (hub dataset or alias) or data.train_file")
        if self.source is not None and (self.train_file or self.eval_file):
            raise ValueError("give either data.source or data.train_file/eval_file, not both")
        if self.eval_file is not None and self.train_file is None:
            raise ValueError("data.eval_file needs data.train_file")
        return self


# --------------------------------------------------------------------------- methods

Targets = Union[Literal["attention", "feedforward", "all-linear"], list[str]]


class FullMethod(_Strict):
    """Every weight is trained."""

    kind: Literal["full"] = "full"


class HeadMethod(_Strict):
    """Only the classification head is trained (a linear probe)."""

    kind: Literal["head"] = "head"


class LoraMethod(_Strict):
    """LoRA (and DoRA with `kind: dora`) through peft."""

    kind: Literal["lora", "dora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    rslora: bool = False
    """Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)."""
    init: Literal["default", "gaussian"] = "default"
    """peft's PiSSA / OLoRA rewrite base weights and cannot yet be converted back with a trained head."""
    targets: Targets = "attention"
    """Module names, or `attention` / `feedforward` / `all-linear` resolved per architecture."""


class LoraPlusMethod(LoraMethod):
    """LoRA+: the B matrices learn `lr_ratio` times faster than A."""

    kind: Literal["loraplus"] = "loraplus"  # type: ignore[assignment]
    lr_ratio: float = Field(16.0, gt=0)


class IA3Method(_Strict):
    kind: Literal["ia3"] = "ia3"
    targets: Targets = "all-linear"
    feedforward_targets: Targets | None = None
    """Targets whose input (not output) is scaled; by default the architecture's feed-forward layers among `targets`."""


class PeftMethod(_Strict):
    """Any other peft method, named by its config class (`VeraConfig`, `LoHaConfig`, ...)."""

    kind: Literal["peft"] = "peft"
    config: str
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _known_peft_config(self) -> "PeftMethod":
        from peftlab.methods import check_peft_options

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

# --------------------------------------------------------------------------- training

DEFAULT_WARMUP_RATIO = 0.06  # as in the recipes of docs/recipes.md (and RoBERTa's fine-tuning)

METRICS = ("accuracy", "f1", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "eval_loss")


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs when reached first)."""
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; default the method's own (DEFAULT_LR: full 5e-5, LoRA 2e-3, ...)."""
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """Share of the steps the learning rate warms up over; default 0.06 unless warmup_steps is given."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this; null disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 autocast on a GPU that has it, fp32 elsewhere (on a CPU with AMX or AVX-512 BF16, bf16 is faster)."""
    fast_dropout: bool | Literal["auto"] = "auto"
    """Draw dropout masks with peftlab's faster CPU sampler (same rate, another random stream);
    `auto`: on when training on a CPU."""
    seen_embedding_rows: bool | Literal["auto"] = "auto"
    """Full fine-tuning: update only the input-embedding rows of tokens in the training data (the same
    result: the other rows' gradients are zero), sparing each step the whole vocabulary's gradient and
    optimizer update; `auto`: on when training on a CPU. On a GPU its steps run without CUDA graphs."""
    first_token_last_layer: bool | Literal["auto"] = "auto"
    """Compute the last encoder layer for the first token only, the one the classifier reads (its keys
    and values still for every token): the same logits and gradients, most of one layer's
    products spared; dropout draws smaller masks, so a seed gives another run. BERT, RoBERTa, ELECTRA
    and DistilBERT classifiers (first_token.py); `auto`: on when training on a CPU, uncompiled.
    Evaluation on a CPU does it whatever this says (packed_tokens.py)."""
    packed_tokens: bool | Literal["auto"] = "auto"
    """Train the encoder's layers on each batch's real tokens packed into one row, padding left out of
    their products, layer norms and dropout masks (attention still sees the padded rows): the same
    logits and gradients, up to summation order; dropout draws smaller masks, so a seed gives another
    run. On a CPU, through fast_dropout's attention, for the encoders it serves (packed_tokens.py);
    `auto`: on where fast_dropout is and batches are random (group_by_length=false): random batches of
    tweets are 40% padding, length-grouped ones 3%, too little to pay for packing."""
    cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay each step's forward and backward passes from CUDA graphs, recorded once per batch
    shape (batches padded to lengths in steps of 64 tokens); `auto`: on for one process on a CUDA GPU
    in bf16 or fp32, for the encoders and methods verified with graphs (step_passes.py)."""
    unpadded_attention: bool | Literal["auto"] = "auto"
    """Attention through flash attention's variable-length kernel, each text over its own tokens,
    instead of SDPA with a padding mask (the same function; another kernel and dropout stream);
    `auto`: on a CUDA GPU of the Ampere generation or newer in bf16 or fp16, for BERT-like encoders."""
    compile: bool = False
    """Compile the encoder's repeated blocks with torch.compile (inductor, dynamic shapes; evaluation
    runs op by op): the H200's LoRA epoch 6.1 s instead of 7.8 s, after 40-60 s of compiling, so it pays on
    runs longer than about 4 minutes (compiled_blocks.py). Needs Triton on a GPU, a C++ compiler on a CPU."""
    seed: int = 42
    eval_every_steps: int | None = Field(None, ge=1)
    """Also evaluate every N optimizer steps (always after each epoch)."""
    log_every_steps: int = Field(10, ge=1)
    best_metric: Literal[METRICS] = "f1_macro"  # type: ignore[valid-type]
    """The saved model is the checkpoint best by this metric."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without improvement of `best_metric`."""
    group_by_length: bool = True
    """Batch texts of similar length together (seeded), so padding is small; `false`: random batches,
    as HF Trainer's, trained on their real tokens only on a CPU (packed_tokens)."""
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

    @model_validator(mode="after")
    def _graphs_without_seen_rows(self) -> "TrainConfig":
        if self.cuda_graphs is True and self.seen_embedding_rows is True:
            raise ValueError("train.cuda_graphs=true cannot record the seen embedding rows of "
                             "train.seen_embedding_rows=true (they check each batch's token ids on the host); "
                             "leave one of them at auto")
        return self

    @model_validator(mode="after")
    def _first_token_uncompiled(self) -> "TrainConfig":
        if self.compile and self.first_token_last_layer is True:
            raise ValueError("train.first_token_last_layer=true is untried with train.compile=true; "
                             "leave first_token_last_layer at auto (off when compiling)")
        return self

    @model_validator(mode="after")
    def _packed_with_fast_dropout(self) -> "TrainConfig":
        if self.packed_tokens is True and self.fast_dropout is False:
            raise ValueError("train.packed_tokens=true trains through fast dropout's attention; "
                             "leave fast_dropout at auto or true")
        return self

    @model_validator(mode="after")
    def _compile_with_traceable_dropout(self) -> "TrainConfig":
        if self.compile and self.fast_dropout is True:
            raise ValueError("train.compile=true cannot compile the numpy masks of train.fast_dropout=true; "
                             "leave fast_dropout at auto (off when compiling)")
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


class OutputConfig(_Strict):
    dir: Path = Path("runs")
    """Parent directory of run directories."""
    name: str | None = None
    """Run directory name, a plain name inside `dir` (letters, digits, `_ - . +`); default `<method>-<timestamp>`."""
    overwrite: bool = False
    """Replace an existing finished run of the same name (only once the new one finishes), and start
    afresh over the checkpoints of an unfinished one; never replaces what is not a peftlab run."""
    save_model: bool = True
    progress: bool = True
    """Show progress bars."""
    cache_dir: Path | None = None
    """Token cache; default `$PEFTLAB_CACHE` or `~/.cache/peftlab`."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        problem = None if name is None else run_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name


# Adapters train a few fresh weights and need far higher rates than full fine-tuning; these are the
# rates that did best in peftlab's own studies on MiniLM + tweets (docs/recipes.md).
DEFAULT_LR = {"full": 5e-5, "head": 1e-3, "lora": 2e-3, "dora": 2e-3, "loraplus": 5e-4, "ia3": 1e-2, "peft": 1e-3}


class RunConfig(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    method: MethodConfig = LoraMethod()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _method_learning_rate(self) -> "RunConfig":
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR[self.method.kind]
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-4` as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["method.r=16", "train.epochs=5"]` -> `{"method.r": 16, ...}`; values parse as YAML."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r} is not of the form section.key=value")
        parsed[key] = _yaml(raw) if raw.strip() else None
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); validation happens afterwards."""
    result = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"override {dotted}: {part} is not a section")
                node[part] = child
            node = child
        node[leaf] = value
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = _yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def validate_config(raw: dict[str, Any], origin: str = "config") -> RunConfig:
    """Validate a raw dict, collecting every problem into one ConfigError."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe_error(err, raw) for err in exc.errors()]
        raise ConfigError(f"{origin}: {len(lines)} problem(s)\n  " + "\n  ".join(lines)) from None


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    raw = apply_overrides(read_yaml(Path(path)), parse_overrides(overrides or []))
    return validate_config(raw, origin=str(path))


NOT_EXPERIMENT_KEYS = frozenset({"output.overwrite", "output.progress", "output.cache_dir"})


def config_differences(saved: dict[str, Any], expected: dict[str, Any], ignore=NOT_EXPERIMENT_KEYS,
                       prefix: str = "") -> list[str]:
    """`train.lr: 0.005 there, 0.001 here` for every dotted key whose value differs. A saved config
    is read with today's defaults first, so that keys added since it was written do not count."""
    if not prefix:
        saved = with_defaults(saved)
    out = []
    for key in sorted(set(saved) | set(expected)):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        a, b = saved.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, ignore, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} there, {b!r} here")
    return out


def with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        return RunConfig.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return raw  # then the differences name what no longer validates


def _describe_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    # Discriminated unions put the tag into the location ("method.lora.r"): drop it.
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHOD_CLASSES:
        loc.pop(1)
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_fields_at(loc[:-1], raw)))
        return f"{key}: unknown key (allowed here: {allowed})"
    if err["type"] == "union_tag_invalid":
        return f"{key}: unknown method kind {err['input'].get('kind')!r} (allowed: {', '.join(METHOD_CLASSES)})"
    if err["type"] == "union_tag_not_found":
        return f"{key}: missing `kind` (one of: {', '.join(METHOD_CLASSES)})"
    message = err["msg"].removeprefix("Value error, ")
    shown = "" if err["type"] in ("missing", "value_error") else f" (got {err.get('input')!r})"
    return f"{key}: {message}{shown}"


def _fields_at(section: list[str], raw: dict[str, Any]) -> list[str]:
    if not section:
        return list(RunConfig.model_fields)
    head = section[0]
    if head == "method":
        kind = (raw.get("method") or {}).get("kind", "lora")
        cls = METHOD_CLASSES.get(kind, LoraMethod)
    else:
        cls = RunConfig.model_fields[head].annotation
    return list(cls.model_fields)  # type: ignore[union-attr]


class ServeSettings(_Strict):
    """Limits of one server; the defaults follow text-embeddings-inference's where it has one."""

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    max_batch_inputs: int = Field(32, ge=1, description="inputs per request; more is 413")
    max_payload_bytes: int = Field(2_000_000, ge=1, description="request body size; more is 413")
    max_concurrent: int = Field(512, ge=1, description="requests in flight; more is 429 at once")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per forward pass")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a request waits for others to batch with")
    timeout_s: float = Field(30.0, gt=0, description="seconds per request; past it, 504")
    auto_truncate: bool = Field(False, description="truncate over-long texts when a request does not say")
    api_key: str | None = Field(None, description="if set, requests need 'Authorization: Bearer <key>'")
    max_text_chars: int = Field(100_000, ge=1, description="characters per text; more is 413 (truncated or not)")
    max_queue_rows: int = Field(4096, ge=1, description="texts waiting for or in a forward pass; more is 429")
    read_timeout_s: float = Field(10.0, gt=0, description="seconds to send a request's headers, and its body; "
                                                         "past it, 408 or the connection is closed")
    max_connections: int = Field(1024, ge=1, description="open connections; past it, 503")
    docs: bool = Field(False, description="serve /docs and /openapi.json")
