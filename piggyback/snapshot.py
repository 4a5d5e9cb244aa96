"""Resume snapshots of one task's training: everything needed to continue bit-exactly after a kill.

A snapshot holds a `TrainState` (piggyback/trainstate.py: networks, optimisers, schedulers, grad
scaler, counters and, for every rank, its RNG states, image pools and loss sums, gathered to rank 0,
which alone writes), the MLflow run id and the fingerprint of the settings. It is one file, `models/.snapshots/<task>/snapshot.pt`, replaced atomically and
loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only.

A snapshot of other settings is stale and ignored (stages/train.py). A damaged one (truncated, edited,
not a snapshot) is never silently dropped, since it may hold hours of training: `load` raises a
SnapshotError that names the file to delete to start the task over.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

import torch

from piggyback import distributed as D
from piggyback.fsutil import atomic_torch_save

FORMAT = 1
FILE = "snapshot.pt"
LOCK = "trainer.lock"
# Fields of a snapshot and their types: checked before training reads any of them.
_FIELDS = {"format": int, "task": str, "fingerprint": str, "world_size": int, "epoch": int, "done": int, "step": int,
           "history": list, "timer": dict, "nets": dict, "optimizers": dict, "schedulers": dict, "scaler": dict,
           "ranks": list}
_RANK_FIELDS = {"rng": dict, "pools": dict, "sums": dict}


class TrainerBusy(RuntimeError):
    """Another live process is training the same task (it holds the task's lock)."""


class SnapshotError(ValueError):
    """A snapshot exists but is damaged; the message says which file to delete."""


def snapshot_dir(models_dir: str | Path, task: str) -> Path:
    """`models/.snapshots/<task>/`: beside the DVC outputs, not one of them."""
    return Path(models_dir) / ".snapshots" / task


def fingerprint(obj: Any) -> str:
    """Hash of the JSON of everything the trajectory depends on; a snapshot of other settings is stale."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def to_cpu(obj: Any) -> Any:
    """Recursively move tensors to the CPU (snapshots load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save(directory: str | Path, state: dict) -> Path:
    """Write the snapshot atomically (a kill leaves the previous snapshot intact)."""
    path = Path(directory) / FILE
    atomic_torch_save(path, {"format": FORMAT, **state})
    return path


def load(directory: str | Path) -> Optional[dict]:
    """The snapshot in `directory`, or None when there is none; SnapshotError when it is damaged."""
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    advice = f"delete {path} to start the task over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, refused global: all mean "damaged"
        raise SnapshotError(f"{path}: damaged snapshot, cannot be read ({type(e).__name__}); {advice}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SnapshotError(f"{path}: snapshot format {got!r} is not {FORMAT}; {advice}")
    for fields, where in [(_FIELDS, state)] + [(_RANK_FIELDS, r) for r in state.get("ranks") or []]:
        for key, tp in fields.items():
            value = where.get(key) if isinstance(where, dict) else None
            if not isinstance(value, tp) or isinstance(value, bool):
                raise SnapshotError(f"{path}: damaged snapshot, field {key!r} is {type(value).__name__}, "
                                    f"expected {tp.__name__}; {advice}")
    if len(state["ranks"]) != state["world_size"] or min(state["epoch"], state["done"], state["step"]) < 0:
        raise SnapshotError(f"{path}: damaged snapshot, inconsistent counters or ranks; {advice}")
    return state


def clear(directory: str | Path) -> None:
    """Delete the task's snapshot folder (and `.snapshots/` when it is left empty)."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    try:
        directory.parent.rmdir()
    except OSError:
        pass


class TrainerLock:
    """One trainer per task: an exclusive `flock` on `<snapshot folder>/trainer.lock`, held for the trainer's life.

    The file names the holder (PID, host, start time) for the message a second trainer gets. The kernel
    drops the lock when its process dies, however it dies, so a dead trainer's lock is simply taken over.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path, self.fd = Path(directory) / LOCK, None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns the previous (dead) holder's description, if the file named one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise TrainerBusy(f"{holder} is already training this task (lock {self.path}): wait for it to end, "
                              "or stop it, then run the stage again") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip() or None
        me = f"PID {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self.fd = fd
        return previous

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def clear_finished(models_dir: str | Path) -> list[str]:
    """Delete the snapshot folders of finished tasks (models/<task>/meta.json exists), e.g. after DVC
    restored a task from its run cache; a folder whose trainer is alive is left alone. Returns the tasks."""
    root, cleared = Path(models_dir) / ".snapshots", []
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        if not (Path(models_dir) / folder.name / "meta.json").is_file():
            continue
        lock = TrainerLock(folder)
        try:
            lock.acquire()
        except (TrainerBusy, OSError):
            continue
        clear(folder)
        lock.release()
        cleared.append(folder.name)
    return cleared


class Snapshots:
    """One task's resume point, all of its logic in one place: lock, load if it matches, save, clear.

    Used as a context manager: rank 0 holds the task's `TrainerLock` inside the block (a second trainer
    gets `TrainerBusy`); on exit a folder left without a snapshot is removed. A snapshot written with
    other settings (`fingerprint`: params, predecessor, data) or another world size is stale: it is
    ignored, said so, and overwritten by the next save.
    """

    def __init__(self, models_dir: str | Path, task: str, fingerprint: str, world_size: int) -> None:
        self.directory, self.task = snapshot_dir(models_dir, task), task
        self.fingerprint, self.world_size = fingerprint, world_size
        self.lock = TrainerLock(self.directory)

    def __enter__(self) -> "Snapshots":
        if D.is_main():
            previous = self.lock.acquire()
            if previous:
                print(f"Taking over {self.lock.path} from {previous}: that process is gone", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.lock.fd is not None and not (self.directory / FILE).is_file():
            self.clear()
        self.lock.release()

    def load(self) -> Optional[dict]:
        """The snapshot to resume from, or None (none, or a stale one)."""
        state = load(self.directory)
        if state is not None and (state.get("fingerprint") != self.fingerprint or state.get("world_size") != self.world_size):
            D.print0(f"Ignoring the snapshot in {self.directory}: it was written with other params, data or world size")
            return None
        return state

    def save(self, state: Any, run_id: Optional[str]) -> None:
        """Save `state` (a TrainState) atomically from rank 0. Collective: every rank must call it."""
        full = state.state_dict()
        if full is not None:
            save(self.directory, {"task": self.task, "fingerprint": self.fingerprint, "world_size": self.world_size,
                                  "run_id": run_id, **full})

    def clear(self) -> None:
        """Delete the snapshot folder (the lock file with it: the task is done)."""
        clear(self.directory)
