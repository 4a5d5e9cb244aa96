"""Lifelong checkpoints: one folder per task holding tasks 1..t as state dicts + JSON metadata.

Follows nanoGPT / nanochat (the checkpoint carries its config; the network is rebuilt from it, never
unpickled). Layout (docs/architecture.md, Checkpoints):
    generators.pt   {"G_A": state_dict, "G_B": state_dict}   (torch.load(weights_only=True))
    probes.pt       optional {task: tensors} written by training, checked by the audit
    meta.json       format_version, config, method, per-bank lambdas, task records (counts, tensor
                    hashes), sha256 of every file, extra fields, and meta_sha256 (of its own content)
Files are verified against meta.json before anything is unpickled, and meta.json against a schema
(types, ranges, task names) before anything is built from it; every failure is a CheckpointError naming
the file and the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .config import GENERATORS as NETS
from .config import NORMS, RANGES, ConfigError, GeneratorConfig, check_lam, check_name, check_range
from .fsutil import atomic_directory, atomic_write_json, sha256_file
from .lifelong import DIRECTIONS, METHODS, MODES, LifelongModel, task_hash
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
    check_meta({**meta, "files": {GENERATORS: "0" * 64}}, Path(out_dir) / META)  # names, ranges: before writing
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
        meta = json.loads(path.read_text(), parse_constant=_refuse_constant)
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
    check_meta(meta, path)
    return meta


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")   # Python's json would read NaN / Infinity


def _need(ok: Any, path: Path, field: str, problem: str) -> None:
    if not ok:
        raise CheckpointError(f"{path}: field {field}: {problem}")


def _lam(value: Any, path: Path, field: str) -> None:
    try:
        check_lam(value, field)
    except ValueError as e:
        raise CheckpointError(f"{path}: field {e}") from None


def _check_config(cfg: Any, path: Path) -> None:
    names = {f.name for f in dataclasses.fields(GeneratorConfig)}
    _need(isinstance(cfg, dict) and set(cfg) == names, path, "config", f"expected a mapping with keys {sorted(names)}")
    _need(cfg["netG"] in NETS, path, "config.netG", f"{cfg['netG']!r} is not one of {list(NETS)}")
    _need(cfg["norm"] in NORMS, path, "config.norm", f"{cfg['norm']!r} is not one of {list(NORMS)}")
    _need(isinstance(cfg["use_dropout"], bool), path, "config.use_dropout", "not true/false")
    for key in ("ngf", "input_nc", "output_nc"):
        value = cfg[key]
        _need(isinstance(value, int) and not isinstance(value, bool), path, f"config.{key}", f"{value!r} is not an integer")
        try:
            check_range(f"config.{key}", value, RANGES[f"ModelConfig.{key}"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: field {e}") from None
    _lam(cfg["lam"], path, "config.lam")
    _need(isinstance(cfg["lam_overrides"], dict), path, "config.lam_overrides", "not a mapping")
    for name, lam in cfg["lam_overrides"].items():
        _lam(lam, path, f"config.lam_overrides.{name}")


def _check_task(r: Any, i: int, banks: dict, path: Path) -> None:
    f = f"tasks[{i}]"
    _need(isinstance(r, dict), path, f, "not a mapping")
    try:
        check_name("task name", r.get("name"))
    except ConfigError as e:
        raise CheckpointError(f"{path}: field {f}.name: {e}") from None
    _need(isinstance(r.get("mode"), str) and r["mode"] in MODES, path, f"{f}.mode", f"{r.get('mode')!r} is not one of {list(MODES)}")
    _need(r.get("direction") in DIRECTIONS, path, f"{f}.direction", f"{r.get('direction')!r} is not one of {list(DIRECTIONS)}")
    _need(r.get("dataset") is None or isinstance(r["dataset"], str), path, f"{f}.dataset", "not a string")
    _need(r.get("finished") is True, path, f"{f}.finished", "a saved task must be finished")
    index, hashes = r.get("index"), r.get("hashes")
    _need(isinstance(index, dict) and set(index) == set(MODES[r["mode"]]), path, f"{f}.index",
          f"expected slots for {list(MODES[r['mode']])}")
    _need(isinstance(hashes, dict) and all(isinstance(h, str) for h in hashes.values()), path, f"{f}.hashes",
          "not a mapping of generator to hash")
    _need(isinstance(r.get("overwritten_by", {}), dict), path, f"{f}.overwritten_by", "not a mapping")
    for which, slot in index.items():
        ok = which in banks and isinstance(slot, int) and not isinstance(slot, bool) and 1 <= slot <= len(banks[which])
        _need(ok, path, f"{f}.index.{which}", f"{slot!r} is not a slot of bank {which}")


def check_meta(meta: dict, path: Path) -> None:
    """Types, ranges and names of every field that rebuilding the model reads; CheckpointError names it."""
    _check_config(meta["config"], path)
    _need(meta["method"] in METHODS, path, "method", f"{meta['method']!r} is not one of {list(METHODS)}")
    banks = meta["banks"]
    _need(isinstance(banks, dict) and "G_A" in banks and set(banks) <= {"G_A", "G_B"}, path, "banks",
          "expected a mapping with G_A (and optionally G_B)")
    for which, slots in banks.items():
        _need(isinstance(slots, list) and all(isinstance(s, dict) for s in slots), path, f"banks.{which}",
              "expected a list of {layer: lambda}")
        for t, lams in enumerate(slots):
            for name, lam in lams.items():
                _lam(lam, path, f"banks.{which}[{t}].{name}")
    tasks = meta["tasks"]
    _need(isinstance(tasks, list), path, "tasks", "expected a list of task records")
    for i, record in enumerate(tasks):
        _check_task(record, i, banks, path)
    names = [r["name"] for r in tasks]
    _need(len(set(names)) == len(names), path, "tasks", f"a task name is used twice: {names}")
    files = meta["files"]
    _need(isinstance(files, dict) and GENERATORS in files and set(files) <= {GENERATORS, PROBES}, path, "files",
          f"expected {GENERATORS} (and optionally {PROBES})")
    for name, digest in files.items():
        _need(isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest), path, f"files.{name}",
              "not a SHA-256")
    _need(isinstance(meta.get("extra", {}), dict), path, "extra", "not a mapping")


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
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{ckpt_dir / META}: cannot rebuild the model: {e}") from e
    if not isinstance(state, dict) or set(state) != set(model.generators):
        raise CheckpointError(f"{ckpt_dir / GENERATORS}: holds generators {sorted(state) if isinstance(state, dict) else state!r}, "
                              f"meta.json describes {sorted(model.generators)}")
    for which, net in model.generators.items():
        try:
            net.load_state_dict(state[which], strict=True)
        except (RuntimeError, TypeError, AttributeError, ValueError) as e:
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


