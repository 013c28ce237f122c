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
from peftlab.windows import Windowed, Windowing, length_summary, window_texts


@dataclass
class Encoded:
    """Token ids of one split, unpadded; padding happens per batch."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    """One per row: a chunked text's label on each of its windows."""
    truncated: int
    documents: np.ndarray | None = None
    """The text each row comes from, where long texts are read in windows (windows.py); else None."""
    text_tokens: np.ndarray | None = None
    """Each text's length in tokens before any cut."""
    pooling: str = "mean"
    """How a text's window logits combine (data.chunk_pooling)."""
    room: int | None = None
    """Tokens of a text that one window holds (max_length less the special tokens)."""

    @property
    def long_texts(self) -> np.ndarray | None:
        """Which texts one window cannot hold: those truncation cuts."""
        if self.text_tokens is None or self.room is None:
            return None
        return self.text_tokens > self.room

    @property
    def text_labels(self) -> np.ndarray:
        """One label per text (a chunked text's first row's)."""
        if self.documents is None:
            return self.labels
        return self.labels[np.unique(self.documents, return_index=True)[1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def cache_root(configured: Path | None) -> Path:
    return Path(configured or os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab")


def encode(table: Table, label_ids: np.ndarray, tokenizer, max_length: int, cache_dir: Path | None,
           windowing: Windowing | None = None) -> Encoded:
    """Tokenise once; the result is cached on disk keyed by texts, tokenizer, max_length and windowing."""
    windowing = windowing or Windowing(max_length=max_length)
    room = max_length - tokenizer.num_special_tokens_to_add(pair=table.pairs is not None)
    with_types = table.pairs is not None and "token_type_ids" in tokenizer.model_input_names
    key = _cache_key(table, tokenizer, max_length, windowing.key)
    path = cache_root(cache_dir) / "tokens" / f"{key}.npz"
    if path.is_file():
        try:
            return _read_tokens(path, label_ids, with_types, windowing.pooling, room)
        except Exception as exc:  # noqa: BLE001 - a damaged zip fails in many ways (BadZipFile, EOFError, ...)
            # A cache is only a copy: a damaged entry (cut short, overwritten) is rebuilt, never fatal.
            warnings.warn(f"token cache {path} is damaged ({type(exc).__name__}: {exc}); tokenising again",
                          stacklevel=2)
    windowed = window_texts(tokenizer, table.texts, table.pairs, windowing, with_types)
    ids = [np.asarray(x, dtype=np.int32) for x in windowed.input_ids]
    types = [np.asarray(x, dtype=np.int8) for x in windowed.token_type_ids] if with_types else None
    _write_tokens(path, ids, types, windowed)
    labels = label_ids if windowed.documents is None else label_ids[windowed.documents]
    return Encoded(ids, types, labels, windowed.truncated, windowed.documents, windowed.text_tokens, windowing.pooling,
                   room)


def _cache_key(table: Table, tokenizer, max_length: int, windowing: str = "") -> str:
    digest = hashlib.sha256()
    digest.update(_tokenizer_identity(tokenizer).encode())
    digest.update(f"|{max_length}|{tokenizer.model_input_names}|{windowing}|".encode())
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


def _write_tokens(path: Path, ids: list[np.ndarray], types: list[np.ndarray] | None, windowed: Windowed) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
    arrays = {"ids": np.concatenate(ids) if ids else np.zeros(0, np.int32), "offsets": offsets,
              "truncated": np.asarray(windowed.truncated), "text_tokens": windowed.text_tokens}
    if types is not None:
        arrays["types"] = np.concatenate(types)
    if windowed.documents is not None:
        arrays["documents"] = windowed.documents
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())  # the bytes are on disk before the name is: a crash leaves no empty entry
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_tokens(path: Path, label_ids: np.ndarray, with_types: bool, pooling: str, room: int) -> Encoded:
    with np.load(path, allow_pickle=False) as stored:
        offsets = stored["offsets"]
        flat = stored["ids"]
        documents = stored["documents"] if "documents" in stored else None
        text_tokens = stored["text_tokens"]
        rows = len(label_ids) if documents is None else len(documents)
        if len(offsets) != rows + 1 or offsets[0] != 0 or offsets[-1] != len(flat) or len(text_tokens) != len(label_ids):
            raise ValueError(f"holds {len(offsets) - 1} rows' offsets and {len(text_tokens)} texts for "
                             f"{len(label_ids)} texts")
        ids = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        types = None
        if with_types:
            flat_types = stored["types"]
            if len(flat_types) != len(flat):
                raise ValueError(f"holds {len(flat_types)} token types for {len(flat)} tokens")
            types = [flat_types[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        labels = label_ids if documents is None else label_ids[documents]
        return Encoded(ids, types, labels, int(stored["truncated"]), documents, text_tokens, pooling, room)


@dataclass
class RunData:
    splits: Splits
    tokenizer: Any
    train: Encoded
    eval: Encoded
    max_length: int = 512

    def summary(self) -> dict[str, Any]:
        labels = self.splits.labels
        room = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=self.splits.train.pairs is not None)
        windows = {f"{role}_windows": len(encoded) for role, encoded in (("train", self.train), ("eval", self.eval))
                   if encoded.documents is not None}
        return {"n_train": len(self.train.text_labels), "n_eval": len(self.eval.text_labels), "task": labels.task,
                "train_class_counts": label_counts(labels, self.train.text_labels),
                "eval_class_counts": label_counts(labels, self.eval.text_labels),
                "truncated_train": self.train.truncated, "truncated_eval": self.eval.truncated,
                "mean_train_tokens": float(self.train.lengths.mean()), **windows,
                "train_text_tokens": length_summary(self.train.text_tokens, room),
                "eval_text_tokens": length_summary(self.eval.text_tokens, room), **self.splits.notes}


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
    windowing = Windowing.of(config)
    train = encode(splits.train, splits.train_ids, tokenizer, config.model.max_length, cache, windowing)
    evaluation = encode(splits.eval, splits.eval_ids, tokenizer, config.model.max_length, cache, windowing)
    return RunData(splits, tokenizer, train, evaluation, config.model.max_length)
