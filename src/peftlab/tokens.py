"""Tokenised splits: each text's token ids, computed once and cached on disk, and the run's data
as the model sees it (`prepare_data`)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftlab.config import RunConfig
from peftlab.data import Table
from peftlab.durable import fsync_dir
from peftlab.models import load_tokenizer
from peftlab.splits import Splits, prepare_splits


@dataclass
class Encoded:
    """Token ids of one split, unpadded; padding happens per batch."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    truncated: int

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def cache_root(configured: Path | None) -> Path:
    return Path(configured or os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab")


def encode(table: Table, label_ids: np.ndarray, tokenizer, max_length: int, cache_dir: Path | None) -> Encoded:
    """Tokenise once; the result is cached on disk keyed by texts, tokenizer and max_length."""
    with_types = table.pairs is not None and "token_type_ids" in tokenizer.model_input_names
    key = _cache_key(table, tokenizer, max_length)
    path = cache_root(cache_dir) / "tokens" / f"{key}.npz"
    if path.is_file():
        try:
            return _read_tokens(path, label_ids, with_types)
        except Exception as exc:  # noqa: BLE001 - a damaged zip fails in many ways (BadZipFile, EOFError, ...)
            # A cache is only a copy: a damaged entry (cut short, overwritten) is rebuilt, never fatal.
            warnings.warn(f"token cache {path} is damaged ({type(exc).__name__}: {exc}); tokenising again",
                          stacklevel=2)
    full = tokenizer(table.texts, table.pairs, truncation=True, max_length=max_length,
                     return_attention_mask=False, return_token_type_ids=with_types)
    # Fast tokenizers keep what truncation cut off, so counting truncated texts needs no second pass.
    truncated = sum(bool(e.overflowing) for e in full.encodings)
    ids = [np.asarray(x, dtype=np.int32) for x in full["input_ids"]]
    types = [np.asarray(x, dtype=np.int8) for x in full["token_type_ids"]] if with_types else None
    _write_tokens(path, ids, types, truncated)
    return Encoded(ids, types, label_ids, truncated)


def _cache_key(table: Table, tokenizer, max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(_tokenizer_identity(tokenizer).encode())
    digest.update(f"|{max_length}|{tokenizer.model_input_names}|".encode())
    for texts in (table.texts, table.pairs or []):
        digest.update(str(len(texts)).encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    return digest.hexdigest()[:32]


def _tokenizer_identity(tokenizer) -> str:
    """What makes the tokenizer's output, without the truncation and padding state that transformers
    sets on the backend at each call: keyed with it, the same tokenizer missed the cache once used."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return repr(tokenizer)
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return json.dumps(state, sort_keys=True)


def _write_tokens(path: Path, ids: list[np.ndarray], types: list[np.ndarray] | None, truncated: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
    arrays = {"ids": np.concatenate(ids) if ids else np.zeros(0, np.int32), "offsets": offsets,
              "truncated": np.asarray(truncated)}
    if types is not None:
        arrays["types"] = np.concatenate(types)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())  # the bytes are on disk before the name is: a crash leaves no empty entry
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_tokens(path: Path, label_ids: np.ndarray, with_types: bool) -> Encoded:
    with np.load(path, allow_pickle=False) as stored:
        offsets = stored["offsets"]
        flat = stored["ids"]
        if len(offsets) != len(label_ids) + 1 or offsets[0] != 0 or offsets[-1] != len(flat):
            raise ValueError(f"holds {len(offsets) - 1} texts' offsets for {len(label_ids)} texts")
        ids = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        types = None
        if with_types:
            flat_types = stored["types"]
            if len(flat_types) != len(flat):
                raise ValueError(f"holds {len(flat_types)} token types for {len(flat)} tokens")
            types = [flat_types[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return Encoded(ids, types, label_ids, int(stored["truncated"]))


@dataclass
class RunData:
    splits: Splits
    tokenizer: Any
    train: Encoded
    eval: Encoded

    def summary(self) -> dict[str, Any]:
        labels = self.splits.labels
        return {"n_train": len(self.train), "n_eval": len(self.eval), "task": labels.task,
                "train_class_counts": label_counts(labels, self.train.labels),
                "eval_class_counts": label_counts(labels, self.eval.labels),
                "truncated_train": self.train.truncated, "truncated_eval": self.eval.truncated,
                "mean_train_tokens": float(self.train.lengths.mean()), **self.splits.notes}


def label_counts(labels, encoded: np.ndarray) -> dict[str, Any]:
    """Texts per class (multi-label: texts carrying each label); for regression the targets' spread."""
    if labels.task == "regression":
        return {"mean": float(encoded.mean()), "std": float(encoded.std()), "min": float(encoded.min()),
                "max": float(encoded.max())}
    counts = encoded.sum(axis=0) if labels.task == "multi_label" else np.bincount(encoded, minlength=len(labels.names))
    return dict(zip(labels.names, np.asarray(counts, dtype=np.int64).tolist()))


def prepare_data(config: RunConfig) -> RunData:
    """Validate and tokenise both splits; every data error surfaces here, before any model loads."""
    splits = prepare_splits(config.data)
    tokenizer = load_tokenizer(config.model.name)
    cache = config.output.cache_dir
    train = encode(splits.train, splits.train_ids, tokenizer, config.model.max_length, cache)
    evaluation = encode(splits.eval, splits.eval_ids, tokenizer, config.model.max_length, cache)
    return RunData(splits, tokenizer, train, evaluation)
