"""Resume snapshots of one task's training: everything needed to continue bit-exactly after a kill.

A snapshot holds the networks, optimisers, schedulers, grad scaler, epoch / step counters, the MLflow
run id and, for every rank, its RNG states, image pools and loss accumulators (gathered to rank 0,
which alone writes). It is one file, `models/.snapshots/<task>/snapshot.pt`, replaced atomically and
loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only.

A snapshot of other settings is stale and ignored (stages/train.py). A damaged one (truncated, edited,
not a snapshot) is never silently dropped, since it may hold hours of training: `load` raises a
SnapshotError that names the file to delete to start the task over.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from piggyback.fsutil import atomic_torch_save

FORMAT = 1
FILE = "snapshot.pt"
# Fields of a snapshot and their types: checked before training reads any of them.
_FIELDS = {"format": int, "task": str, "fingerprint": str, "world_size": int, "epoch": int, "done": int, "step": int,
           "history": list, "timer": dict, "nets": dict, "optimizers": dict, "schedulers": dict, "scaler": dict,
           "ranks": list}
_RANK_FIELDS = {"rng": dict, "pools": dict, "sums": dict}


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


def capture_rng(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_to_rank0(local: Any) -> Optional[list]:
    """Every rank's `local` as a list on rank 0 (None elsewhere); [local] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, out, dst=0)
    return out


def save(directory: str | Path, state: dict) -> Path:
    """Write the snapshot atomically (a kill leaves the previous snapshot intact)."""
    path = Path(directory) / FILE
    atomic_torch_save(path, to_cpu({"format": FORMAT, **state}))
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
