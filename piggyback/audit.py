"""Forgetting audit: the final checkpoint must reproduce, bit for bit, what every task produced when it finished.

Zero forgetting is Piggyback GAN's claim (Zhai et al., ECCV 2020). Training records, per task and
generator, fixed inputs and the frozen network's outputs (`piggyback.probes`); the audit reruns them from
the final checkpoint with `probes.run_probe` (CPU, float32, one thread: the arithmetic of the recording)
and compares bytes. For an altered task it names the first layer whose dense weights differ from the
task's own checkpoint ``models/<task>/`` (written when the task finished, verified on load), and the
stored tensors that changed. The fine-tuning baseline drifts by design: its drift is measured, and
earlier tasks are scored again with the final weights.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch

from . import lifelong
from .checkpoint import GENERATORS, CheckpointError, load_lifelong, load_probes, read_meta
from .fsutil import sha256_file
from .lifelong import LifelongModel
from .probes import run_probe, tensor_sha256

Reference = Callable[[str], tuple[Optional[LifelongModel], Optional[str]]]  # task -> (model, why not)


@dataclass
class AuditResult:
    report: dict[str, Any]                                  # What metrics/forgetting.json holds.
    failures: list[str] = field(default_factory=list)       # One message per altered (task, generator).


def load_for_audit(ckpt_dir: Union[str, Path]) -> tuple[LifelongModel, Optional[str]]:
    """The checkpoint's model and, when `load_lifelong` refused it, why.

    A missing, truncated or modified file (sha256 against meta.json) re-raises load_lifelong's
    CheckpointError, which names the file. When every file is intact but task tensors no longer match the
    hashes their tasks recorded (a model altered in memory, then saved), the tensors are loaded anyway so
    that the probes can show the damage and the altered layer can be named.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        return load_lifelong(ckpt_dir), None
    except CheckpointError as e:
        error = e
    meta = read_meta(ckpt_dir)
    for name, expected in meta["files"].items():
        path = ckpt_dir / name
        if not path.is_file() or sha256_file(path) != expected:
            raise error
    try:
        model = LifelongModel.from_description(meta)
        state = torch.load(ckpt_dir / GENERATORS, map_location="cpu", weights_only=True)
        for which, net in model.generators.items():
            net.load_state_dict(state[which], strict=True)
    except Exception:  # noqa: BLE001 - structurally broken: load_lifelong's message is the right one
        raise error from None
    model.meta = meta
    return model, str(error)


def rerun_probe(model: LifelongModel, task: str, which: str, probe: dict) -> dict[str, Any]:
    """Rerun one recorded probe: exact (same bytes, the criterion of `probes.check_probes`) and max |diff|."""
    y, recorded = run_probe(model.generator(task, which), probe["input"]), probe["output"]
    sha = tensor_sha256(y)
    exact = sha == probe["sha256"] and torch.equal(y, recorded)
    diff = None
    if y.shape == recorded.shape:
        d = (y.double() - recorded.double()).abs().max().item() if y.numel() else 0.0
        diff = d if math.isfinite(d) else None
    return {"exact": exact, "max_abs_diff": diff, "probe_sha256": probe["sha256"], "output_sha256": sha,
            "probe_images": int(probe["input"].shape[0])}


@torch.no_grad()
def altered_layers(model: LifelongModel, reference: LifelongModel, task: str, which: str) -> tuple[list[str], list[str]]:
    """(layers, stored tensors) of generator `which` that differ from `reference` for `task`.

    Layers: modules whose dense weight, bias or norm state for the task differ, in module order (e.g.
    ``G_A.model.10.conv_block.1``); a task also reads earlier tasks' bank filters, so the stored tensors
    of every slot up to the task's are compared (e.g. ``G_A.model.1.filters (task t1)``).
    """
    a = model.materialize(task, which).state_dict()
    b = reference.materialize(task, which).state_dict()
    layers: list[str] = []
    for key, value in a.items():
        if key not in b or b[key].shape != value.shape or not torch.equal(b[key], value):
            layer = f"{which}.{key.rsplit('.', 1)[0]}"
            if layer not in layers:
                layers.append(layer)
    owners = {r["index"][which]: r["name"] for r in reference.tasks if which in r["index"]}
    tensors = []
    for slot in range(1, model.task(task)["index"][which] + 1):
        mine = lifelong.task_state(model.generators[which], slot)
        theirs = lifelong.task_state(reference.generators[which], slot)
        tensors += [f"{which}.{k} (task {owners.get(slot, slot)})" for k, v in mine.items()
                    if k not in theirs or theirs[k].shape != v.shape or not torch.equal(theirs[k], v)]
    return layers, tensors


def reference_checkpoints(models_dir: Union[str, Path]) -> Reference:
    """task -> its own checkpoint ``models_dir/<task>`` (loaded once), or (None, why it is unavailable)."""
    cache: dict[str, tuple[Optional[LifelongModel], Optional[str]]] = {}

    def get(task: str) -> tuple[Optional[LifelongModel], Optional[str]]:
        if task not in cache:
            try:
                cache[task] = (load_lifelong(Path(models_dir) / task), None)
            except (CheckpointError, OSError) as e:
                cache[task] = (None, f"its own checkpoint cannot be compared with: {e}")
        return cache[task]
    return get


def audit_model(model: LifelongModel, probes: Optional[dict], reference: Optional[Reference] = None) -> AuditResult:
    """Check every task of `model` against its recorded probes.

    Generators a later task re-trained (``overwritten_by``, the fine-tuning baseline) are measured but
    not failed. Any other mismatch is a failure naming the task and, via `reference` (see
    `reference_checkpoints`), the first altered layer. A task without probes is reported unverified.
    """
    tasks, failures = {}, []
    for record in model.tasks:
        name, recorded = record["name"], (probes or {}).get(record["name"])
        if not recorded:
            tasks[name] = {"max_abs_diff": None, "exact": None, "generators": {},
                           "reason": "no probe was recorded when the task finished: not verifiable"}
            continue
        gens = {}
        for which, probe in recorded.items():
            r = rerun_probe(model, name, which, probe)
            slot = record["index"][which]
            r["tensor_hash_matches_record"] = lifelong.task_hash(model.generators[which], slot) == \
                record.get("hashes", {}).get(which)
            if which in record.get("overwritten_by", {}):
                r["overwritten_by"] = record["overwritten_by"][which]   # drift by design, not a failure
            elif not r["exact"]:
                failures.append(_locate(model, name, which, r, reference))
            gens[which] = r
        diffs = [g["max_abs_diff"] for g in gens.values()]
        tasks[name] = {"max_abs_diff": None if None in diffs else max(diffs),
                       "exact": all(g["exact"] for g in gens.values()), "generators": gens}
    report = {"method": model.method, "device": "cpu", "torch": torch.__version__,
              "all_exact": all(t["exact"] is True for t in tasks.values()), "tasks": tasks}
    return AuditResult(report, failures)


def _locate(model: LifelongModel, task: str, which: str, r: dict, reference: Optional[Reference]) -> str:
    """Fill r["altered_layer"] / r["altered_tensors"]; return the failure message."""
    ref, why = reference(task) if reference else (None, "no reference checkpoint given")
    layers, tensors = altered_layers(model, ref, task, which) if ref is not None else ([], [])
    if ref is not None and not layers:
        why = "no weight differs from the task's own checkpoint: the outputs changed without a weight change"
    r.update(altered_layer=layers[0] if layers else None, altered_layers=layers, altered_tensors=tensors)
    where = f"first altered layer {layers[0]}" if layers else f"altered layer unknown ({why})"
    if tensors:
        where += f" (changed stored tensors: {', '.join(tensors[:4])}{' ...' if len(tensors) > 4 else ''})"
    diff = "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
    return f"task {task!r} was altered: {which} no longer reproduces its probe (max |diff| {diff}); {where}"


def rescore_with_final_weights(model: LifelongModel, tasks: list[str], data_root: Union[str, Path],
                               size: Union[int, Mapping[str, int]],
                               metrics_dir: Optional[Union[str, Path]] = None, batch_size: int = 50,
                               num_test: int = 0, device: Any = None, progress: bool = True) -> dict[str, dict]:
    """Fine-tuning baseline: L1 / PSNR / SSIM of earlier tasks (G_A) with the final weights on their test splits,
    beside the values right after training (``metrics/tasks/<task>.json``): ``forgetting_l1`` = final - after."""
    from .data.datasets import TestSet
    from .scoring import translate_split

    out = {}
    for name in tasks:
        record = model.task(name)
        data_dir = Path(data_root) / str(record.get("dataset"))
        row: dict[str, Any] = {"final_l1": None, "final_psnr": None, "final_ssim": None}
        if not record.get("dataset") or not data_dir.is_dir():
            row["final_reason"] = f"{data_dir} not found: run `dvc repro prepare@{record.get('dataset')}`"
        else:
            task_size = size[name] if isinstance(size, Mapping) else size
            testset = TestSet(data_dir, record["direction"], task_size, limit=num_test)
            gt = translate_split(model.materialize(name, "G_A"), testset, None, batch_size, device, 0, progress).metrics
            row.update(final_l1=gt["l1"], final_psnr=gt["psnr"], final_ssim=gt["ssim"])
            if gt.get("gt_reason"):
                row["final_reason"] = gt["gt_reason"]
        after = _read_json(Path(metrics_dir) / "tasks" / f"{name}.json") if metrics_dir else None
        row["l1_after_training"] = (after or {}).get("l1")
        row["forgetting_l1"] = (row["final_l1"] - row["l1_after_training"]
                                if None not in (row["final_l1"], row["l1_after_training"]) else None)
        out[name] = row
    return out


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def audit_checkpoint(final_dir: Union[str, Path], models_dir: Optional[Union[str, Path]] = None,
                     data_root: Optional[Union[str, Path]] = None,
                     size: Optional[Union[int, Mapping[str, int]]] = None,
                     metrics_dir: Optional[Union[str, Path]] = None, batch_size: int = 50, num_test: int = 0,
                     device: Any = None, progress: bool = True) -> AuditResult:
    """Audit the final checkpoint `final_dir` (see `audit_model`); `models_dir` holds each task's own
    checkpoint (default: final_dir's parent). For the fine-tuning baseline, earlier tasks are also scored
    with the final weights when `data_root` and `size` are given. CheckpointError: a damaged file."""
    final_dir = Path(final_dir)
    model, load_error = load_for_audit(final_dir)
    result = audit_model(model, load_probes(final_dir), reference_checkpoints(models_dir or final_dir.parent))
    result.report = {"final_checkpoint": str(final_dir), **result.report}
    if load_error:
        result.report["load_error"] = load_error
    if model.method == "finetune" and data_root is not None and size is not None:
        earlier = model.task_names()[:-1]
        rescored = rescore_with_final_weights(model, earlier, data_root, size, metrics_dir, batch_size, num_test,
                                              device, progress)
        for name, row in rescored.items():
            result.report["tasks"][name].update(row)
    return result
