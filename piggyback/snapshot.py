"""Resume snapshots of one task's training: everything needed to continue bit-exactly after a kill.

A snapshot holds a `TrainState` (piggyback/trainstate.py: networks, optimisers, schedulers, grad
scaler, counters and, for every rank, its RNG states, image pools and loss sums, gathered to rank 0,
which alone writes), the MLflow run id and the fingerprint of the settings. It is one file, `models/.snapshots/<task>/snapshot.pt`, replaced atomically and
loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from piggyback import distributed as D
from piggyback.fsutil import atomic_torch_save

FORMAT = 1
FILE = "snapshot.pt"


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
    """The snapshot in `directory`, or None when there is none."""
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise RuntimeError(f"{path}: snapshot format {state.get('format')!r} is not {FORMAT}; delete it to start over")
    return state


def clear(directory: str | Path) -> None:
    """Delete the task's snapshot folder (and `.snapshots/` when it is left empty)."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    try:
        directory.parent.rmdir()
    except OSError:
        pass


class Snapshots:
    """One task's resume point, all of its logic in one place: load if it matches, save, clear.

    A snapshot written with other settings (`fingerprint`: params, predecessor, data) or another world
    size is stale: it is ignored, said so, and overwritten by the next save.
    """

    def __init__(self, models_dir: str | Path, task: str, fingerprint: str, world_size: int) -> None:
        self.directory, self.task = snapshot_dir(models_dir, task), task
        self.fingerprint, self.world_size = fingerprint, world_size

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
        clear(self.directory)
