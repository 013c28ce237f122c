"""Long texts as the model reads them (`data.long_texts`): cut after `max_length` tokens (`truncate`),
the first and the last tokens (`head_tail`), or every token in windows that overlap (`chunks`). A
chunked text becomes several rows, each with the text's label; `combine` turns their logits back
into one per text, so evaluation and prediction answer per text, never per window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from peftlab.errors import ConfigError
from peftlab.families import classifier_pooling


@dataclass(frozen=True)
class Windowing:
    mode: str = "truncate"
    max_length: int = 128
    stride: int = 0
    head_tokens: int = 0
    pooling: str = "mean"

    @classmethod
    def of(cls, config) -> "Windowing":
        data = config.data
        return cls(data.long_texts, config.model.max_length, data.stride or 0, data.head_tokens or 0,
                   data.chunk_pooling)

    @property
    def key(self) -> str:
        """What the token cache must tell apart (max_length is keyed on its own)."""
        return {"truncate": "", "head_tail": f"head_tail{self.head_tokens}",
                "chunks": f"chunks{self.stride}"}[self.mode]


@dataclass
class Windowed:
    """Token ids of each row, the text each row comes from (None: a row per text) and each text's
    length in tokens before any cut (special tokens not counted)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    documents: np.ndarray | None
    text_tokens: np.ndarray
    truncated: int


def window_texts(tokenizer, texts: list[str], pairs: list[str] | None, windowing: Windowing,
                 with_types: bool) -> Windowed:
    if windowing.mode == "truncate":
        full = tokenizer(texts, pairs, truncation=True, max_length=windowing.max_length,
                         return_attention_mask=False, return_token_type_ids=with_types)
        special = tokenizer.num_special_tokens_to_add(pair=pairs is not None)
        # Fast tokenizers keep what truncation cut off (stride 0, special tokens in each piece), so the
        # whole length needs no second pass.
        lengths = np.array([len(e.ids) - special + sum(len(o.ids) - special for o in e.overflowing)
                            for e in full.encodings], dtype=np.int64)
        return Windowed(full["input_ids"], full["token_type_ids"] if with_types else None, None, lengths,
                        sum(bool(e.overflowing) for e in full.encodings))
    content = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    prefix, suffix = _special_tokens(tokenizer)
    room = windowing.max_length - len(prefix) - len(suffix)
    lengths = np.array([len(c) for c in content], dtype=np.int64)
    truncated = int((lengths > room).sum())
    if windowing.mode == "head_tail":
        head, tail = windowing.head_tokens, room - windowing.head_tokens
        ids = [prefix + (c if len(c) <= room else c[:head] + c[len(c) - tail:]) + suffix for c in content]
        return Windowed(ids, None, None, lengths, truncated)
    step = room - windowing.stride
    ids, documents = [], []
    for document, c in enumerate(content):
        for start in range(0, max(len(c) - windowing.stride, 1), step):
            ids.append(prefix + c[start : start + room] + suffix)
            documents.append(document)
    return Windowed(ids, None, np.asarray(documents, dtype=np.int64), lengths, truncated)


def check_classifier(mode: str, model_name: str, model_config) -> None:
    """Chunks need a classifier that reads a window's first token ([CLS], <s>): every window begins
    with one, trained on its text's label, and that is the setting the windows are tested and
    measured with (docs/long-documents.md). A head that pools every token or the last one, or one
    of a family peftlab does not know, stops here, before any text is tokenized."""
    if mode != "chunks" or model_config is None:  # an unreadable config: loading the model says why
        return
    pooling = classifier_pooling(model_config)
    if pooling != "cls":
        reads = f"pools {pooling}" if pooling else f"is of a family peftlab does not know ({model_config.model_type})"
        raise ConfigError(f"data.long_texts=chunks needs a classifier that reads the first token; the one of "
                          f"{model_name!r} {reads}: use data.long_texts=truncate or head_tail, or such a model")


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a single text gets before and after its own ([CLS] ... [SEP], <s> ... </s>)."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start : start + len(probe)] == probe:
            return full[:start], full[start + len(probe):]
    raise ValueError(f"cannot find a text's own tokens among its special ones ({full})")


def combine(logits: np.ndarray, documents: np.ndarray, pooling: str) -> np.ndarray:
    """One row of logits per text from its windows' rows: their mean, maximum or log-sum-exp."""
    count = int(documents.max()) + 1 if len(documents) else 0
    if pooling == "max":
        out = np.full((count, logits.shape[1]), -np.inf, dtype=logits.dtype)
        np.maximum.at(out, documents, logits)
        return out
    if pooling == "logsumexp":
        peak = np.full((count, logits.shape[1]), -np.inf, dtype=logits.dtype)
        np.maximum.at(peak, documents, logits)
        total = np.zeros_like(peak)
        np.add.at(total, documents, np.exp(logits - peak[documents]))
        return peak + np.log(total)
    total = np.zeros((count, logits.shape[1]), dtype=logits.dtype)
    np.add.at(total, documents, logits)
    return total / np.bincount(documents, minlength=count)[:, None]


def length_summary(text_tokens: np.ndarray, room: int) -> dict[str, Any]:
    """How long the texts are against the window: the share that does not fit, median and 95th percentile."""
    if not len(text_tokens):
        return {}
    return {"longer_than_max_length": int((text_tokens > room).sum()),
            "share_longer": float((text_tokens > room).mean()),
            "median_tokens": float(np.median(text_tokens)), "p95_tokens": float(np.percentile(text_tokens, 95))}
