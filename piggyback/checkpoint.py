"""Lifelong checkpoints: one folder per task holding tasks 1..t as state dicts + JSON metadata.

Follows nanoGPT / nanochat (the checkpoint carries its config; the network is rebuilt from it, never
unpickled). Layout (docs/architecture.md, Checkpoints):
    generators.pt   {"G_A": state_dict, "G_B": state_dict}   (torch.load(weights_only=True))
    probes.pt       optional {task: tensors} written by training, checked by the audit
    meta.json       format_version, config, method, per-bank lambdas, task records (counts, tensor
                    hashes), sha256 of every file, extra fields, and meta_sha256 (of its own content)
Files are verified against meta.json before anything is unpickled; every failure is a CheckpointError
naming the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from .fsutil import atomic_directory, atomic_write_json, sha256_file
from .lifelong import LifelongModel, task_hash
from .networks import GeneratorConfig
from .snapshot import to_cpu

FORMAT_VERSION = 1
META, GENERATORS, PROBES = "meta.json", "generators.pt", "probes.pt"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, tampered with or inconsistent; the message names it."""


def save_lifelong(model: LifelongModel, out_dir: str | Path, probes: Optional[dict] = None,
                  extra_meta: Optional[dict] = None) -> Path:
    """Write `model` (every task finished) to a new folder `out_dir`, atomically; never overwrites.

    Args:
        model: the lifelong model; tasks 1..t are all saved (a model with 0 tasks is the `init` folder).
        out_dir: destination folder; FileExistsError if it exists.
        probes: optional tensors (e.g. {task: {"input": x, "output": y}}) saved as probes.pt.
        extra_meta: JSON-able fields stored under meta["extra"] (git SHA, params, ...).
    """
    if model.pending is not None:
        raise RuntimeError(f"task {model.pending['name']!r} is not finished: call finish_task() before saving")
    meta = {"format_version": FORMAT_VERSION, **model.describe(), "extra": dict(extra_meta or {}), "files": {}}
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata is not JSON-serialisable (task records / extra_meta): {e}") from e
    state = {w: {k: v.detach().to("cpu") for k, v in net.state_dict().items()} for w, net in model.generators.items()}
    with atomic_directory(out_dir) as tmp:
        torch.save(state, tmp / GENERATORS)
        if probes is not None:
            torch.save(to_cpu(probes), tmp / PROBES)
        meta["files"] = {name: sha256_file(tmp / name) for name in (GENERATORS, PROBES) if (tmp / name).exists()}
        meta["meta_sha256"] = meta_digest(meta)
        atomic_write_json(tmp / META, meta)
    return Path(out_dir)


def meta_digest(meta: dict) -> str:
    """sha256 of meta.json's content (canonical JSON, without this field): catches edits and bit rot."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint folder, checked for format; CheckpointError names the file."""
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a lifelong checkpoint folder?)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON (truncated or edited?): {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}"
                              f" is not {FORMAT_VERSION}")
    for key in ("config", "method", "banks", "tasks", "files", "meta_sha256"):
        if key not in meta:
            raise CheckpointError(f"{path}: key {key!r} is missing")
    if meta_digest(meta) != meta["meta_sha256"]:
        raise CheckpointError(f"{path}: content does not match its meta_sha256: the file was modified or damaged")
    return meta


def verify_files(ckpt_dir: str | Path) -> list[Path]:
    """Check every file meta.json lists against its sha256 (without loading); CheckpointError names the file."""
    meta = read_meta(ckpt_dir)
    return [_check_file(Path(ckpt_dir), name, meta) for name in meta["files"]]


def _check_file(ckpt_dir: Path, name: str, meta: dict) -> Path:
    """The path of a file of the checkpoint, after checking its sha256 against meta.json."""
    path = ckpt_dir / name
    expected = meta["files"].get(name)
    if expected is None:
        raise CheckpointError(f"{path}: not listed in {ckpt_dir / META}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match meta.json ({expected[:12]}...): "
                              "the file is truncated or was modified")
    return path


def _load_file(ckpt_dir: Path, name: str, meta: dict, map_location: Any) -> Any:
    """torch.load one file after checking its sha256 against meta.json."""
    path = _check_file(ckpt_dir, name, meta)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported against the file
        raise CheckpointError(f"{path}: cannot be loaded: {e}") from e


def load_lifelong(ckpt_dir: str | Path, map_location: Any = "cpu") -> LifelongModel:
    """Rebuild a LifelongModel from meta.json alone and load its tensors; verifies files and task hashes.

    The metadata is available as `model.meta` (extra fields under `model.meta["extra"]`).
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    state = _load_file(ckpt_dir, GENERATORS, meta, map_location)
    try:
        model = LifelongModel.from_description(meta)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt_dir / META}: cannot rebuild the model: {e}") from e
    if not isinstance(state, dict) or set(state) != set(model.generators):
        raise CheckpointError(f"{ckpt_dir / GENERATORS}: holds generators {sorted(state) if isinstance(state, dict) else state!r}, "
                              f"meta.json describes {sorted(model.generators)}")
    for which, net in model.generators.items():
        try:
            net.load_state_dict(state[which], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt_dir / GENERATORS}: {which} does not match meta.json: {e}") from e
    model.to(map_location)
    for record in model.tasks:                  # tensors must be exactly those each task finished with
        for which, slot in record.get("index", {}).items():
            if which in record.get("overwritten_by", {}):
                continue                        # fine-tuning baseline: a later task re-trained this slot
            if task_hash(model.generators[which], slot) != record.get("hashes", {}).get(which):
                raise CheckpointError(f"{ckpt_dir / GENERATORS}: tensors of task {record['name']!r} ({which}) do not "
                                      f"match the hash recorded in meta.json")
    model.meta = meta
    return model


def load_probes(ckpt_dir: str | Path, map_location: Any = "cpu") -> Optional[dict]:
    """probes.pt of a checkpoint (hash-checked), or None when it has none."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    if PROBES not in meta["files"]:
        return None
    return _load_file(ckpt_dir, PROBES, meta, map_location)


def check_compatible(model: LifelongModel, model_cfg: Any, method: Optional[str] = None) -> None:
    """Raise CheckpointError naming the first key where `model`'s architecture differs from the requested
    `ModelConfig` (params.yaml `model:`) or `method`; training calls this before adding a task."""
    wanted = GeneratorConfig.from_model_config(model_cfg)
    have = model.config.to_dict()
    for key, value in wanted.to_dict().items():
        if have[key] != value:
            raise CheckpointError(f"model.{key}: the checkpoint was built with {have[key]!r}, params ask for {value!r}")
    if method is not None and method != model.method:
        raise CheckpointError(f"train.method: the checkpoint was built with {model.method!r}, params ask for {method!r}")


