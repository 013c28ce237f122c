"""Training checkpoints that are complete or absent: written aside, fsynced, manifest last, renamed in.

A checkpoint holds what exact resumption needs: the trainable weights, the optimizer and scheduler
states, the RNG states (python, numpy, torch, cuda), the loop's progress (step, epoch, batches of the
epoch already seen, best evaluation so far) and how many metric lines were logged. Tensors go to
safetensors files, everything else to JSON: nothing is ever unpickled on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftlab.durable import fsync_dir, fsync_file
from peftlab.errors import CheckpointError
from peftlab.speed.embedding_rows import full_weights

MANIFEST = "manifest.json"
_WEIGHTS, _OPTIMIZER, _RNG, _STATE = "trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # progress, scheduler, rng (python/numpy), metrics_lines, accumulation step


# --------------------------------------------------------------------------- writing


def save_checkpoint(root: Path, model: torch.nn.Module, optimizer, scheduler, state: dict[str, Any],
                    keep: int, sharded: tuple[dict, dict] | None = None) -> Path:
    """Write `root/step-NNNNNNNN/`; a crash at any moment leaves it complete or absent. `sharded`:
    the trained weights and the optimizer state gathered whole, where the model holds shards (FSDP)."""
    step = int(state["progress"]["step"])
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        weights, optimizer_state = sharded or (trainable_state(model), optimizer.state_dict())
        tensors, optimizer_meta = _optimizer_tensors(optimizer_state)
        save_file({name: t.contiguous() for name, t in weights.items()}, tmp / _WEIGHTS)
        save_file(tensors, tmp / _OPTIMIZER)
        save_file(_torch_rng(), tmp / _RNG)
        full_state = {**state, "scheduler": scheduler.state_dict(), "optimizer": optimizer_meta,
                      "rng": {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}}
        (tmp / _STATE).write_text(json.dumps(full_state, default=float), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            fsync_file(tmp / name)
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        fsync_file(tmp / MANIFEST)
        _swap_in(tmp, final)
        fsync_dir(root)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [c.name for c in _candidates(root) if c != final]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final} ({_reason(exc)}); {kept}") from exc
    for old in _candidates(root)[:-keep]:
        _remove(old)
    for leftover in root.glob(".step-*"):  # of writes or removals that a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _reason(exc: BaseException) -> str:
    """`No space left on device` from an OSError, or from safetensors' `... (os error 28)`."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    code = re.search(r"\(os error (\d+)\)", str(exc))
    return os.strerror(int(code.group(1))) if code else str(exc)


def abandon_after(root: Path, step: int) -> list[Path]:
    """Resuming at `step` starts a new branch of the run: every later checkpoint belongs to the old
    one. They are renamed to hidden `.abandoned-step-*` names (never resumed from, nor counted by
    keep_checkpoints; removed with the other checkpoints when the run finishes) and the new names returned."""
    moved = []
    for path in _candidates(root):
        if int(path.name.split("-", 1)[1]) <= step:
            continue
        target, n = root / f".abandoned-{path.name}", 2
        while os.path.lexists(target):
            target, n = root / f".abandoned-{path.name}-{n}", n + 1
        os.replace(path, target)
        moved.append(target)
    if moved:
        fsync_dir(root)
    return moved


def _aside(path: Path) -> Path:
    """Rename a checkpoint to a hidden name (not a candidate for resuming) and return that name."""
    hidden = path.with_name(f".{path.name}.old{os.getpid()}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    fsync_dir(path.parent)
    return hidden


def _remove(path: Path) -> None:
    """Delete a checkpoint. Renamed aside first, never deleted in place: a kill during the deletion
    leaves no visible checkpoint with files missing."""
    shutil.rmtree(_aside(path), ignore_errors=True)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. The end-of-epoch checkpoint may rewrite the step just saved: the old one
    is renamed aside, so a kill leaves it whole or the step absent."""
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    old = _aside(final)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (adapters + head, or everything for full fine-tuning)."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad} | full_weights(model)
    return {name: p.detach().cpu().contiguous() for name, p in trained.items()}


def _optimizer_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _torch_rng() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return states


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer | np.floating):
        return value.item()
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- reading


def _candidates(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def verify(path: Path) -> str | None:
    """None when every file of the manifest is there with its checksum; else what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest_path} is not a valid manifest"
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if _sha256(file) != digest:
            return f"{file} does not match its checksum (corrupted or truncated)"
    return None


def find_checkpoint(root: Path, log=print) -> Checkpoint | None:
    """The latest checkpoint under `root` whose manifest verifies; skipped ones are reported."""
    for path in reversed(_candidates(root)):
        problem = verify(path)
        if problem is None:
            log(f"peftlab: resuming from {path}")
            return read_checkpoint(path)
        log(f"peftlab: skipping checkpoint {path.name}: {problem}")
    return None


def read_checkpoint(path: Path) -> Checkpoint:
    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    return Checkpoint(path, json.loads((path / _STATE).read_text(encoding="utf-8")))


def restore_weights(checkpoint: Checkpoint, model: torch.nn.Module, sharded: bool = False) -> None:
    """The checkpoint's trained weights into the model (into each process's shards under FSDP)."""
    saved = load_file(str(checkpoint.path / _WEIGHTS))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in saved]
    unknown = [name for name in saved if name not in params]
    if missing or unknown:
        problem = f"lacks {len(missing)} trained parameter(s), e.g. {missing[0]}" if missing else \
            f"has {len(unknown)} parameter(s) this model lacks, e.g. {unknown[0]}"
        raise CheckpointError(f"{checkpoint.path / _WEIGHTS} {problem}: it was written for another method or model, "
                              "or with another speed.seen_embedding_rows")
    if sharded:
        from peftlab.training.sharding import load_whole_weights

        load_whole_weights(model, saved)
        return
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def restore_optimizer(checkpoint: Checkpoint, optimizer, scheduler, model: torch.nn.Module | None = None) -> None:
    """Optimizer and scheduler state; `model` where it is sharded (FSDP), to place each process's part."""
    tensors = load_file(str(checkpoint.path / _OPTIMIZER))
    meta = checkpoint.state["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    whole = {"state": state, "param_groups": meta["param_groups"]}
    if model is not None:
        from peftlab.training.sharding import load_whole_optimizer

        load_whole_optimizer(model, optimizer, whole)
    else:
        optimizer.load_state_dict(whole)
    scheduler.load_state_dict(checkpoint.state["scheduler"])


def restore_rng(checkpoint: Checkpoint) -> None:
    rng = checkpoint.state["rng"]
    python = rng["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(checkpoint.path / _RNG))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
