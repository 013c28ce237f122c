"""What a run, a resume or an export may replace or delete: only peftlab's own, never a user's files,
never another process's work, never the newer branch's checkpoints; full disks and renames made safe."""

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import SafetensorError
from test_checkpoints import resumable as checkpoints_resumable
from test_checkpoints import stop_at

import peftlab.runs as runs_module
import peftlab.training.checkpoints as checkpoints_module
import peftlab.training.run as train_module
from peftlab.cli import main
from peftlab.config_loading import validate_config
from peftlab.errors import ConfigError
from peftlab.runs import RunError, atomic_write_text, replace_directory
from peftlab.serving.export import export_run
from peftlab.training.checkpoints import CheckpointError, verify
from peftlab.training.resume import TrainingInterrupted
from peftlab.training.run import train


def resumable(make_config, name: str, **train_options):
    """test_checkpoints' resumable run, one epoch unless told otherwise."""
    return checkpoints_resumable(make_config, name, **{"epochs": 1, **train_options})


def interrupted(make_config, monkeypatch, name: str, step: int, **train_options):
    """A run stopped by SIGTERM at `step` (checkpoints every 4 steps, 15 steps an epoch); its config."""
    config = resumable(make_config, name, **train_options)
    stop_at(monkeypatch, step)
    with pytest.raises(TrainingInterrupted):
        train(config)
    monkeypatch.undo()
    return config


def visible_checkpoints(config) -> list[str]:
    root = config.output.dir / f"{config.output.name}.incomplete" / "checkpoints"
    return sorted(p.name for p in root.glob("step-*"))


# --------------------------------------------------------------------------- 1. export targets


@pytest.fixture(scope="module")
def finished_run(tiny_models, toy_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety-run")
    return train(validate_config({
        "model": {"name": str(tiny_models["bert"]), "max_length": 32},
        "data": {"train_file": str(toy_files[0]), "eval_file": str(toy_files[1])},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "lr": 1e-2},
        "output": {"dir": str(root), "name": "run", "progress": False, "cache_dir": str(root / "cache")},
    }))


def test_export_never_replaces_a_directory_that_is_not_an_earlier_export(finished_run, tmp_path, capsys):
    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    (models / "mine" / "weights.bin").write_bytes(b"a user's file")
    for extra in ([], ["--force"]):
        assert main(["export", str(finished_run), "--merged", str(models), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{models} exists and is not a peftlab export" in err
        assert (models / "mine" / "weights.bin").read_bytes() == b"a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # nothing built aside either
    (tmp_path / "link").symlink_to(models)
    assert main(["export", str(finished_run), "--merged", str(tmp_path / "link"), "--force"]) == 2
    assert (models / "mine" / "weights.bin").exists()


def test_export_goes_into_an_empty_directory_and_replaces_an_export_only_with_force(finished_run, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    assert main(["export", str(finished_run), "--merged", str(out)]) == 0
    marker = json.loads((out / "peftlab_export.json").read_text())
    assert marker["format"] == "peftlab-export" and marker["run"] == "run"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["export", str(finished_run), "--merged", str(out)]) == 2
    assert f"{out} holds an earlier peftlab export; pass --force to replace it" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    time.sleep(0.01)
    assert export_run(finished_run, out, force=True) == out
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp and (out / "peftlab_export.json").is_file()


# --------------------------------------------------------------------------- 2. run names and targets


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", "..", ".hidden", "x\n", "toy.incomplete", "a" * 129])
def test_run_names_are_plain(make_config, name):
    with pytest.raises(ConfigError, match="output.name: .* (not a plain name|ends with .incomplete)"):
        make_config("bert", output={"name": name})


def test_run_names_of_studies_stay_valid(make_config):
    make_config("bert", output={"name": "lora_targetsq_lin+v_lin-" + "x" * 50 + "-seed42"})


@pytest.mark.parametrize("place", ["toy", "toy.incomplete"])
def test_a_directory_that_is_not_a_run_is_never_deleted(make_config, place):
    config = make_config("bert", train={"epochs": 1}, output={"overwrite": True})
    foreign = config.output.dir / place
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(RunError, match=rf"{foreign} is in the way and is not .*peftlab run; move it"):
        train(config)
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_a_file_or_link_at_the_run_target_is_refused(make_config, tmp_path):
    config = make_config("bert", train={"epochs": 1}, output={"overwrite": True})
    config.output.dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "summary.json").write_text("{}")  # looks finished, through the link
    (elsewhere / "config.yaml").write_text("{}")
    (config.output.dir / "toy").symlink_to(elsewhere)
    with pytest.raises(RunError, match="is in the way and is not a peftlab run"):
        train(config)
    assert (elsewhere / "summary.json").exists()


# --------------------------------------------------------------------------- 3. checkpoints and locks


def test_a_restart_without_resume_keeps_the_checkpoints(make_config, monkeypatch):
    config = interrupted(make_config, monkeypatch, "again", 5, epochs=1)
    assert visible_checkpoints(config) == ["step-00000004", "step-00000005"]
    with pytest.raises(RunError, match=r"again.incomplete holds checkpoints of an unfinished run \(latest "
                                       r"step-00000005\): continue it with resume=auto, or set output.overwrite=true"):
        train(config)
    assert visible_checkpoints(config) == ["step-00000004", "step-00000005"]
    fresh = resumable(make_config, "again", epochs=1, max_steps=2)
    fresh.output.overwrite = True
    run = train(fresh)
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def _hold_lock(output_dir: Path, name: str):
    lock, run = output_dir / f".{name}.lock", output_dir / name
    script = ("import sys; from pathlib import Path; from peftlab.runs import RunLock\n"
              f"lock = RunLock(Path({str(lock)!r}), Path({str(run)!r})).acquire()\n"
              "print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_on_the_same_run_is_refused_naming_the_holder(make_config, monkeypatch):
    config = interrupted(make_config, monkeypatch, "shared", 5, epochs=1)
    holder = _hold_lock(config.output.dir, "shared")
    try:
        for resume in ("auto", None):
            with pytest.raises(RunError, match=rf"run .*shared is in use by process {holder.pid} on host "
                                               rf"{socket.gethostname()} since \d{{4}}-\d\d-\d\dT"):
                train(config, resume=resume)
        assert visible_checkpoints(config) == ["step-00000004", "step-00000005"]
    finally:
        holder.kill()  # the kernel lets go of a dead process's lock: nothing stale is left
        holder.wait()
    run = train(config, resume="auto")
    assert (run / "summary.json").exists() and not (config.output.dir / ".shared.lock").exists()


def test_the_lock_is_let_go_whichever_way_a_run_ends(tmp_path):
    from peftlab.runs import RunLock

    lock = RunLock(tmp_path / ".x.lock", tmp_path / "x").acquire()
    holder = json.loads((tmp_path / ".x.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunError, match=f"in use by process {os.getpid()}"):
        RunLock(tmp_path / ".x.lock", tmp_path / "x").acquire()  # another open file: flock refuses it too
    lock.release()
    RunLock(tmp_path / ".x.lock", tmp_path / "x").acquire().release()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 4. resume=auto needs a name


def test_resume_without_a_run_name_is_refused(make_config, tmp_path):
    config = make_config("bert", train={"epochs": 1}, output={"name": None})
    for resume in ("auto", tmp_path / "step-00000004"):
        with pytest.raises(RunError, match=r"resume=.* needs output.name, the name of the run to continue"):
            train(config, resume=resume)
    assert not config.output.dir.exists()


# --------------------------------------------------------------------------- 5. a resume at an older step


def test_resuming_at_an_older_step_sets_the_newer_checkpoints_aside(make_config, monkeypatch, capsys):
    config = interrupted(make_config, monkeypatch, "branch", 12, epochs=1)
    root = config.output.dir / "branch.incomplete" / "checkpoints"
    assert visible_checkpoints(config) == ["step-00000008", "step-00000012"]
    stop_at(monkeypatch, 10)
    with pytest.raises(TrainingInterrupted):
        train(config, resume=root / "step-00000008")
    monkeypatch.undo()
    assert visible_checkpoints(config) == ["step-00000008", "step-00000010"]  # the new branch only
    assert (root / ".abandoned-step-00000012").is_dir()
    capsys.readouterr()
    run = train(config, resume="auto")
    assert f"resuming from {root / 'step-00000010'}" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 16))  # one branch, no step twice


# --------------------------------------------------------------------------- 6. what else decides the result


def _rewrite_labels(path: Path, source: Path, mapping: dict[str, str]) -> None:
    frame = pd.read_csv(source)
    frame["label"] = frame["label"].map(lambda x: mapping.get(x, x))
    frame.to_csv(path, index=False)


def test_resume_refuses_other_data_labels_or_base_weights(make_config, monkeypatch, tiny_models, toy_files,
                                                           tmp_path, capsys):
    from transformers import AutoModel

    model, train_csv, eval_csv = tmp_path / "base", tmp_path / "train.csv", tmp_path / "eval.csv"
    shutil.copytree(tiny_models["bert"], model)
    shutil.copy(toy_files[0], train_csv)
    shutil.copy(toy_files[1], eval_csv)
    config = make_config("bert", model={"name": str(model)}, data={"train_file": str(train_csv),
                         "eval_file": str(eval_csv)}, method={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                         train={"epochs": 1, "checkpoint_every": 4}, output={"name": "inputs"})
    stop_at(monkeypatch, 5)
    with pytest.raises(TrainingInterrupted):
        train(config)
    monkeypatch.undo()

    for csv, source in ((train_csv, toy_files[0]), (eval_csv, toy_files[1])):
        _rewrite_labels(csv, source, {"pos": "yes"})  # same order, same ids: only the names differ
    with pytest.raises(CheckpointError, match=r"written for other inputs: the label names \(\['neg', 'pos'\] there, "
                                              r"\['neg', 'yes'\] here\) changed since"):
        train(config, resume="auto")
    shutil.copy(toy_files[1], eval_csv)
    _rewrite_labels(train_csv, toy_files[0], {})
    frame = pd.read_csv(train_csv)
    frame.loc[0, "text"] = "good w1 w2"
    frame.to_csv(train_csv, index=False)
    with pytest.raises(CheckpointError, match=r"other inputs: the training or evaluation data \(texts, their labels "
                                              r"or tokenization\) changed") as refused:
        train(config, resume="auto")
    assert "label names" not in str(refused.value) and "base model" not in str(refused.value)
    shutil.copy(toy_files[0], train_csv)
    weights = (model / "model.safetensors").read_bytes()
    other = AutoModel.from_pretrained(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other.save_pretrained(model)
    with pytest.raises(CheckpointError, match=r"other inputs: the base model's weights \(model.name's files\) changed"):
        train(config, resume="auto")
    (model / "model.safetensors").write_bytes(weights)
    assert visible_checkpoints(config) == ["step-00000004", "step-00000005"]  # the refusals changed nothing

    # A checkpoint from before the fingerprints were kept: accepted, with a warning.
    latest = config.output.dir / "inputs.incomplete" / "checkpoints" / "step-00000005"
    state = json.loads((latest / "state.json").read_text())
    assert set(state["identity"]) == {"data", "labels", "base_model"} and state["identity"]["base_model"]
    del state["identity"]
    (latest / "state.json").write_text(json.dumps(state))
    manifest = json.loads((latest / "manifest.json").read_text())
    manifest["files"]["state.json"] = checkpoints_module._sha256(latest / "state.json")
    (latest / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    run = train(config, resume="auto")
    assert "warning: checkpoint step-00000005 predates the data, label and base model fingerprints" in \
        capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["steps"] == 15


# --------------------------------------------------------------------------- 7. finishing and fsync


def test_the_checkpoints_stay_until_the_run_is_in_place(make_config, monkeypatch):
    config = resumable(make_config, "late", epochs=1)
    real = runs_module.replace_directory

    def fails_for_the_run(build, target):
        if Path(target) == config.output.dir / "late":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        return real(build, target)

    monkeypatch.setattr(runs_module, "replace_directory", fails_for_the_run)
    with pytest.raises(OSError, match="Input/output error"):
        train(config)
    monkeypatch.undo()
    assert visible_checkpoints(config) == ["step-00000008", "step-00000012"]  # still resumable
    run = train(config, resume="auto")
    assert not (run / "checkpoints").exists() and not (config.output.dir / "late.incomplete").exists()


def test_every_rename_is_followed_by_a_sync_of_its_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("rename", str(Path(target).parent.resolve())))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def assert_synced(what):
        renamed = {d for kind, d in events if kind == "rename"}
        assert renamed, what
        for directory in renamed:
            last_rename = max(i for i, e in enumerate(events) if e == ("rename", directory))
            assert ("sync", directory) in events[last_rename:], f"{what}: {directory} not synced after its rename"
        events.clear()

    atomic_write_text(tmp_path / "a.json", "{}")
    assert_synced("atomic_write_text")
    replace_directory(lambda d: (d.mkdir(), (d / "f").write_text("1")), tmp_path / "dir")
    replace_directory(lambda d: (d.mkdir(), (d / "f").write_text("2")), tmp_path / "dir")
    assert_synced("replace_directory")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    root = tmp_path / "checkpoints"
    for step in (1, 2):  # the second removes the first (keep=1): renamed aside, then deleted
        checkpoints_module.save_checkpoint(root, model, optimizer, scheduler, {"progress": {"step": step}}, keep=1)
    assert_synced("checkpoints")
    checkpoints_module.save_checkpoint(root, model, optimizer, scheduler, {"progress": {"step": 3}}, keep=5)
    assert checkpoints_module.abandon_after(root, 2) == [root / ".abandoned-step-00000003"]
    assert_synced("abandon_after")


# --------------------------------------------------------------------------- 8. a full disk


ENOSPC_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.8


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs at tmp_path/runs (as root); None where mounting is not possible."""
    mount = tmp_path / "runs"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield None
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(directory: Path) -> None:
    """Write until the file system has no byte left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_disk_while_checkpointing_is_reported_and_leaves_nothing_half_written(make_config, monkeypatch,
                                                                                    small_filesystem):
    config = resumable(make_config, "full", epochs=1)
    real = train_module.save_checkpoint
    calls = {"n": 0}

    if small_filesystem is not None:  # the real library on a really full file system
        assert Path(config.output.dir) == small_filesystem

        def save(root, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                _fill(small_filesystem)
            return real(root, *args, **kwargs)

        monkeypatch.setattr(train_module, "save_checkpoint", save)
    else:  # what the real save_file raises on ENOSPC (checked on a tmpfs with safetensors 0.8)
        real_save_file = checkpoints_module.save_file

        def save_file(tensors, path, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 3:  # the second checkpoint's first file
                raise SafetensorError(ENOSPC_MESSAGE)
            return real_save_file(tensors, path, *args, **kwargs)

        monkeypatch.setattr(checkpoints_module, "save_file", save_file)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000008 \(No space left on "
                                              r"device\); the previous checkpoint step-00000004 is intact") as failed:
        train(config)
    assert isinstance(failed.value.__cause__, SafetensorError) and "os error 28" in str(failed.value.__cause__)
    root = config.output.dir / "full.incomplete" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000004"] and verify(root / "step-00000004") is None
