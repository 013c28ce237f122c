"""Tiny random-initialised encoders, a word-level tokenizer and a learnable toy task: no downloads."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core: each worker (and the commands it starts) computes on one thread, or the
    # workers' OpenMP threads spin against each other for the same cores. Set before torch loads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from peftlab.config import RunConfig
from peftlab.config_loading import validate_config

POSITIVE = ["good", "great", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = [f"w{i}" for i in range(40)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_rows(n: int, seed: int) -> pd.DataFrame:
    """Label = whether the text holds a positive or a negative word, among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["neg", "pos"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + POSITIVE + NEGATIVE + FILLER)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def tiny_config(arch: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0)
    if arch == "distilbert":
        return tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, **common)
    if arch == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64, **common)
    if arch == "roberta":
        return tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=70, bos_token_id=2, eos_token_id=3, **common)
    if arch == "deberta-v2":
        return tf.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64, relative_attention=True, pos_att_type=["c2p", "p2c"],
                                  position_buckets=16, **common)
    raise ValueError(arch)


ARCHS = ["distilbert", "bert", "roberta", "deberta-v2"]


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per CPU this process may run on (xdist would count physical cores: one on
    a 2-vCPU machine that shows them as threads of one core), at most 8 (memory). More workers than
    CPUs is slower: Ray and torchrun tests start processes of their own."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 8))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny base model (safetensors + tokenizer) per architecture."""
    import torch
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer()
    paths = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = AutoModel.from_config(tiny_config(arch, len(tokenizer)))
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        paths[arch] = root / arch
    return paths


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("toy")
    toy_rows(240, seed=1).to_csv(root / "train.csv", index=False)
    toy_rows(80, seed=2).to_csv(root / "eval.csv", index=False)
    return root / "train.csv", root / "eval.csv"


@pytest.fixture
def make_config(tiny_models, toy_files, tmp_path):
    """A validated RunConfig for a tiny model on the toy task; keyword sections override."""

    def make(arch: str = "bert", **sections: dict[str, Any]) -> RunConfig:
        raw: dict[str, Any] = {
            "model": {"name": str(tiny_models[arch]), "max_length": 32},
            "data": {"train_file": str(toy_files[0]), "eval_file": str(toy_files[1])},
            "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 3, "batch_size": 16, "lr": 5e-3, "log_every_steps": 5},
            "output": {"dir": str(tmp_path / "runs"), "name": "toy", "progress": False,
                       "cache_dir": str(tmp_path / "cache")},
        }
        for section, values in sections.items():
            raw[section] = values if section == "method" else {**raw.get(section, {}), **values}
        return validate_config(raw)

    return make


def write_study(tiny_models, toy_files, root: Path, name: str = "toy-study", train: dict | None = None,
                **study: Any) -> Path:
    """A study file over the tiny BERT and the toy task; keyword arguments are top-level study keys,
    `train` changes the base config's train section."""
    import yaml

    spec = {
        "name": name,
        "config": {
            "model": {"name": str(tiny_models["bert"]), "max_length": 32},
            "data": {"train_file": str(toy_files[0]), "eval_file": str(toy_files[1])},
            "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "log_every_steps": 5, **(train or {})},
            "output": {"dir": str(root / "runs"), "progress": False, "cache_dir": str(root / "cache")},
        },
        **study,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture
def make_study(tiny_models, toy_files, tmp_path):
    def make(name: str = "toy-study", **study: Any) -> Path:
        return write_study(tiny_models, toy_files, tmp_path, name, **study)

    return make


def poison_training_forward(monkeypatch, bad, value: float = float("nan")) -> None:
    """Multiply the classifier's output by `value` on the training forwards `bad(n)` picks (n from 1),
    so that the loss of exactly those steps is non-finite."""
    import peftlab.training.run as train_module

    real_apply = train_module.apply_method

    def poisoned(model, method):
        model = real_apply(model, method)
        calls = {"n": 0}

        def hook(module, args, output):
            calls["n"] += module.training
            return output * value if module.training and bad(calls["n"]) else output

        model.base_model.model.classifier.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "apply_method", poisoned)
