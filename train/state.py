"""Resumable training checkpoints, written atomically, never pickled.

    OUT/checkpoints/step-00000300/
        model/                 what the stage saves (a loadable model checkpoint)
        optimizer.safetensors  AdamW moments, flattened as state.<param index>.<name>
        rng.safetensors        torch CPU (and CUDA) generator states
        trainer.json           step, data position, scheduler and optimizer hyper-parameters

Each is written in a temporary folder renamed into place when complete, so a process killed
mid-write (even by SIGKILL) leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.errors import CheckpointError, ConfigError
from vlm.fileio import atomic_folder

PREFIX = "step-"
LOCK = "run.lock"


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """One training process per run folder. Two runs writing one OUT would interleave their rows in
    metrics.csv and their checkpoints. The writer holds an exclusive lock on OUT/run.lock (and writes
    its pid there for the error message). The kernel releases the lock when the process ends, even by
    SIGKILL, so resuming after a crash needs no clean-up and a reused pid cannot look like a live
    owner; taking the lock is one atomic call, so two runs started together cannot both get it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    if not _try_lock(fd):
        os.close(fd)
        owner = _lock_owner(path)
        raise ConfigError(f"{out} is being written by another training run{f' (pid {owner})' if owner else ''}; "
                          "stop it or give another --out.")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        # Closing releases the lock. The file stays: removing it would let a run that opened it just
        # before lock it while a third run creates a new file and locks that one too.
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "nt":  # no fcntl on Windows; msvcrt's byte-range lock is also dropped on exit
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError on POSIX, PermissionError from msvcrt: held by another process
        return False
    return True


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None  # being written by the run that holds it


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    folder = checkpoints_dir(out)
    done = sorted(p for p in folder.glob(f"{PREFIX}*") if (p / "trainer.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def write(out: Path, step: int, stage, model, optimizer, scheduler, order, keep_last: int) -> Path:
    folder = checkpoints_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREFIX}{step:08d}"
    with atomic_folder(target, tmp_prefix=".tmp-") as tmp:  # the checkpoint appears complete or not at all
        stage.save(_unwrap(model), tmp / "model")
        tensors, groups = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        trainer = {
            "step": step, "epoch": order.epoch, "offset": order.offset,
            "scheduler": scheduler.state_dict(), "param_groups": groups,
            "python_random": _python_state(),
        }
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    _prune(folder, keep_last)
    return target


def write_model(stage, model, folder: Path) -> None:
    """The final model alone (no optimizer), atomically."""
    with atomic_folder(folder) as tmp:
        stage.save(_unwrap(model), tmp)


def restore(folder: Path, stage, model, optimizer, scheduler, order) -> int:
    """Load a checkpoint into the live objects; return its step."""
    try:
        trainer = json.loads((folder / "trainer.json").read_text())
        stage.load_trained(model, folder / "model")
        state = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), trainer["param_groups"])
        rng = load_file(str(folder / "rng.safetensors"))
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {folder}: {e}") from e
    optimizer.load_state_dict(state)
    scheduler.load_state_dict(trainer["scheduler"])
    order.epoch, order.offset = trainer["epoch"], trainer["offset"]
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in rng:
        torch.cuda.set_rng_state_all(list(rng["torch_cuda"]))
    random.setstate(_python_state_from(trainer["python_random"]))
    return int(trainer["step"])


def _unwrap(model):
    return getattr(model, "module", model)


def _prune(folder: Path, keep_last: int) -> None:
    done = sorted(p for p in folder.glob(f"{PREFIX}*") if (p / "trainer.json").is_file())
    for old in done[: max(0, len(done) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return tensors


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_state_from(data: list) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss
