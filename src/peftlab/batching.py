"""Batches of tokenised texts: grouped by length (or random), padded per batch, as loaders."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from peftlab.tokens import Encoded

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What of a batch the model takes (not its labels or row index)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


class LengthGroupedBatches:
    """Batches of indices; with grouping, texts of similar length share a batch (less padding).

    Training order is seeded by (seed, epoch): reproducible and resumable. Evaluation batches
    are sorted longest first, the order that pads least.
    """

    MEGABATCH = 50  # batches per sorted window: small enough to keep the order random

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool, group_by_length: bool, seed: int = 0,
                 weights: np.ndarray | None = None, documents: np.ndarray | None = None,
                 max_per_document: int | None = None):
        self.lengths, self.batch_size = lengths, batch_size
        self.shuffle, self.group_by_length, self.seed = shuffle, group_by_length, seed
        self.weights = weights  # each example's chance to be drawn, with replacement (data.sampler: balanced)
        # Windows of long texts (data.max_chunks_per_doc): at most this many rows of a text an epoch.
        self.documents = documents if shuffle and max_per_document else None
        self.max_per_document = max_per_document
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self._rows_an_epoch() / self.batch_size)

    def _rows_an_epoch(self) -> int:
        if self.documents is None:
            return len(self.lengths)
        return int(np.minimum(np.bincount(self.documents), self.max_per_document).sum())

    def _drawn(self, rng: np.random.Generator) -> np.ndarray:
        """This epoch's rows in random order: all, or at most `max_per_document` windows of a text."""
        order = rng.permutation(len(self.lengths))
        if self.documents is not None:
            by_text = np.argsort(self.documents[order], kind="stable")
            starts = np.searchsorted(self.documents[order][by_text], self.documents[order][by_text])
            rank = np.empty(len(order), dtype=np.int64)
            rank[by_text] = np.arange(len(order)) - starts  # place of each row among its text's, in `order`
            order = order[rank < self.max_per_document]
        if self.weights is not None:
            chance = self.weights[order] / self.weights[order].sum()
            order = rng.choice(order, size=len(order), replace=True, p=chance)
        return order

    def __iter__(self) -> Iterator[list[int]]:
        n, size = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable") if self.group_by_length else np.arange(n)
            yield from (order[i : i + size].tolist() for i in range(0, n, size))
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = self._drawn(rng)
        n = len(order)
        if not self.group_by_length:
            yield from (order[i : i + size].tolist() for i in range(0, n, size))
            return
        window = size * self.MEGABATCH
        batches = []
        for start in range(0, n, window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
        for b in rng.permutation(len(batches)):
            yield batches[b].tolist()


class EncodedDataset(torch.utils.data.Dataset):
    def __init__(self, encoded: Encoded):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> int:
        return i  # the collator reads the arrays directly: no per-item dicts


class Collator:
    """Pads a batch to its longest text, optionally rounded up to a multiple (for GPU tensor cores,
    or to few shapes for CUDA graphs) but not past `max_width`."""

    def __init__(self, encoded: Encoded, pad_id: int, pad_to_multiple_of: int = 1, max_width: int | None = None):
        self.encoded, self.pad_id, self.multiple, self.max_width = encoded, pad_id, pad_to_multiple_of, max_width

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        seqs = [self.encoded.input_ids[i] for i in indices]
        width = max(len(s) for s in seqs)
        rounded = -(-width // self.multiple) * self.multiple
        width = max(width, min(rounded, self.max_width)) if self.max_width else rounded
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                 "labels": torch.from_numpy(self.encoded.labels[indices]),
                 "index": torch.as_tensor(indices, dtype=torch.int64)}
        if self.encoded.token_type_ids is not None:
            types = np.zeros((len(seqs), width), dtype=np.int64)
            for row, i in enumerate(indices):
                types[row, : len(self.encoded.token_type_ids[i])] = self.encoded.token_type_ids[i]
            batch["token_type_ids"] = torch.from_numpy(types)
        return batch


def set_sampler_epoch(loader, epoch: int) -> None:
    """Seed this epoch's order. With several processes accelerate wraps our sampler in its
    BatchSamplerShard, whose `set_epoch` does not reach it, so the chain is walked to find it."""
    loader.set_epoch(epoch)
    sampler = getattr(loader, "batch_sampler", None)
    while sampler is not None and not isinstance(sampler, LengthGroupedBatches):
        sampler = getattr(sampler, "batch_sampler", None)
    if sampler is not None:
        sampler.set_epoch(epoch)


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Each example's chance to be drawn so that every class is drawn equally often."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return weights / weights.sum()


def make_loader(encoded: Encoded, batch_size: int, shuffle: bool, group_by_length: bool, seed: int,
                pad_id: int, pad_to_multiple_of: int = 1, max_width: int | None = None,
                balanced: bool = False, max_per_document: int | None = None) -> torch.utils.data.DataLoader:
    weights = balanced_weights(encoded.labels) if balanced and shuffle else None
    sampler = LengthGroupedBatches(encoded.lengths, batch_size, shuffle, group_by_length, seed, weights,
                                   encoded.documents, max_per_document)
    # Pinned batches go to a GPU without the host waiting for the copy (accelerate sends them with
    # non_blocking, see make_accelerator), so it can prepare the next step meanwhile.
    return torch.utils.data.DataLoader(EncodedDataset(encoded), batch_sampler=sampler,
                                       collate_fn=Collator(encoded, pad_id, pad_to_multiple_of, max_width),
                                       pin_memory=torch.cuda.is_available())


def evaluation_loader(encoded: Encoded, pad_id: int, batch_size: int, seed: int, pad_multiple: int = 1):
    """Evaluation batches: sorted longest first, the order that pads least."""
    return make_loader(encoded, batch_size, shuffle=False, group_by_length=True, seed=seed, pad_id=pad_id,
                       pad_to_multiple_of=pad_multiple)
