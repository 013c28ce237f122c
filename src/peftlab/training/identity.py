"""What decides a run's result beside its config: kept in its checkpoints, so that a resume refuses
to go on where the data, the label names or the base weights changed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from peftlab.config import ModelConfig, RunConfig
from peftlab.errors import CheckpointError
from peftlab.tokens import RunData
from peftlab.training.checkpoints import Checkpoint


def run_identity(config: RunConfig, data: RunData) -> dict[str, Any]:
    """What decides a run's result beside its config, kept in its checkpoints so that a resume can
    refuse to go on where one of them changed: the examples as trained on (tokens and labels of both
    splits), the label names in order, and the content of the base model's files."""
    return {"data": data_fingerprint(data), "labels": list(data.splits.labels.names),
            "base_model": base_model_hash(config.model)}


def data_fingerprint(data: RunData) -> str:
    """sha256 of both splits as the model sees them: every text's token ids (and token types, which
    cover the tokenizer, data.max_length and the texts themselves) and its label id."""
    digest = hashlib.sha256()
    for split in (data.train, data.eval):
        lengths = split.lengths
        digest.update(f"|{len(split)}|".encode())
        digest.update(lengths.astype(np.int64).tobytes())
        digest.update(np.concatenate(split.input_ids).astype(np.int64).tobytes() if len(split) else b"")
        if split.token_type_ids is not None:
            digest.update(b"|types|" + (np.concatenate(split.token_type_ids).astype(np.int8).tobytes()
                                        if len(split) else b""))
        digest.update(b"|labels|" + np.asarray(split.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


BASE_MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "config.json")


def base_model_hash(cfg: ModelConfig) -> str | None:
    """sha256 of the base model's weight files and config.json (names, sizes, bytes): a local
    directory, the packaged alias, or a hub model's cached snapshot; None where no files are found."""
    from peftlab.assets import resolve_model_name

    directory = _model_directory(resolve_model_name(cfg.name))
    if directory is None:
        return None
    files = sorted({f for pattern in BASE_MODEL_FILES for f in directory.glob(pattern) if f.is_file()})
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"|{file.name}|{file.stat().st_size}|".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _model_directory(name: str) -> Path | None:
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a hub name, or no hub client: nothing to hash
        return None
    return Path(cached).parent if isinstance(cached, str) else None


IDENTITY_NAMES = {"data": "the training or evaluation data (texts, their labels or tokenization)",
                  "labels": "the label names", "base_model": "the base model's weights (model.name's files)"}


def check_identity(checkpoint: Checkpoint, current: dict[str, Any]) -> None:
    """Refuse a resume where the data, the label names or the base weights differ from the checkpoint's;
    a checkpoint written before they were kept is accepted with a warning."""
    saved = checkpoint.state.get("identity")
    if not saved:
        print(f"peftlab: warning: checkpoint {checkpoint.path.name} predates the data, label and base model "
                   "fingerprints; resuming without checking that they are unchanged")
        return
    changed = []
    for key, what in IDENTITY_NAMES.items():
        there, here = saved.get(key), current.get(key)
        if there is not None and here is not None and there != here:
            changed.append(f"{what} ({there} there, {here} here)" if key == "labels" else what)
    if changed:
        raise CheckpointError(f"checkpoint {checkpoint.path} was written for other inputs: {'; '.join(changed)} "
                              "changed since; resume with the same ones, or set output.overwrite=true to start afresh")
