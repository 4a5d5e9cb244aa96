"""Evaluate one learned task: translate its test split, score it, keep the translations and sample grids.

The protocol is the field's: per task, the whole test split translated and saved as PNG, compared with the
real target-domain test images at the same resolution (the dataset's crop_size) on pool3 features of pytorch-fid's
FID Inception: FID and KID (see `scoring`). Where the true output of each input is known (paired datasets,
the embedded suite) L1, PSNR and SSIM as well, beside the do-nothing reference (`donothing`).
`tracking.log_evaluation` logs the result as an ``evaluate:<task>`` run under the task's training run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch

from .checkpoint import load_lifelong
from .config import Params, dataset_data, task_recipe
from .donothing import do_nothing_scores
from .fsutil import atomic_directory
from .scoring import FidModel, FidUnavailableError, fid_kid, load_fid_model, translate_split
from .translate import default_device, sample_grid, save_png

# Code (paper): G_A (G: the task's direction), G_B (F: the reverse, CycleGAN tasks only).
DIRECTIONS = {"G_A": ("", "fake_B", "real_B", "grid.png"), "G_B": ("reverse_", "fake_A", "real_A", "grid_reverse.png")}


def write_reference_images(images: Iterable[np.ndarray], out_dir: Path) -> list[Path]:
    """The real target-domain images as evaluated (resized to the evaluation size): ``<out_dir>/0000.png``..."""
    return [save_png(out_dir / f"{i:04d}.png", a if a.ndim == 3 else a[..., None]) for i, a in enumerate(images)]


@dataclass
class Evaluation:
    """One task's evaluation: what the stage writes as JSON and what it logs into MLflow."""
    metrics: dict[str, Any]             # The flat dict written to metrics/tasks/<task>.json and logged.
    run_id: Optional[str]               # The task's training run in MLflow (task record `mlflow_run_id`).
    artifacts: list[Path]               # Sample grids, in the final output folder.


def evaluate_task(params: Params, task: str, ckpt_dir: Union[str, Path], data_dir: Union[str, Path],
                  out_dir: Union[str, Path], cache_dir: Union[str, Path], device: Any = None,
                  progress: bool = True, fid_model: Optional[FidModel] = None) -> Evaluation:
    """Translate the task's test split (G_A; and G_B for CycleGAN tasks, keys prefixed ``reverse_``) and score it.

    Args:
        params: validated params.yaml (reads eval, data.crop_size or the dataset's, tasks.<task>).
        task: task id; the checkpoint `ckpt_dir` must hold it with the mode/direction/dataset params give.
        data_dir: the task's prepared dataset. out_dir: replaced atomically with fake_B/, real_B/, grid.png
            (and fake_A/, real_A/, grid_reverse.png). cache_dir: cached real-image Inception features.
        fid_model: an already loaded `FidModel` (tests); default `load_fid_model(eval.fid_weights, ...)`.
    Raises:
        FidUnavailableError (eval.require_fid without official weights), CheckpointError, ValueError.
    """
    from .data.datasets import TestSet, target_images

    cfg, recipe = params.eval, task_recipe(params, task)
    size = dataset_data(params, recipe.dataset).crop_size
    device = torch.device(device) if device is not None else default_device()
    fm = fid_model or load_fid_model(cfg.fid_weights, cfg.require_fid, device)  # fails before any work
    if cfg.require_fid and not fm.official:
        raise FidUnavailableError(f"eval.require_fid is set but FID is unavailable: {fm.reason}")
    model = load_lifelong(ckpt_dir)
    record = _task_record(model, task, recipe, ckpt_dir)
    metrics: dict[str, Any] = {"task": task, "dataset": recipe.dataset, "mode": recipe.mode,
                               "direction": recipe.direction, "resolution": size}
    out_dir, artifacts = Path(out_dir), []
    with atomic_directory(out_dir, overwrite=True) as tmp:
        for which in [w for w in DIRECTIONS if w in record["index"]]:
            prefix, fake_name, real_name, grid_name = DIRECTIONS[which]
            reverse = which == "G_B"
            testset = TestSet(data_dir, recipe.direction, size, reverse=reverse, limit=cfg.num_test)
            split = translate_split(model.materialize(task, which), testset, tmp / fake_name, cfg.batch_size,
                                    device, cfg.grid_images, progress)
            reals = write_reference_images(target_images(data_dir, recipe.direction, size, reverse), tmp / real_name)
            target = "B" if (recipe.direction == "AtoB") != reverse else "A"
            key_parts = {"dataset": recipe.dataset, "split": "test", "domain": target, "resolution": size}
            part = {"n_test": len(split.files), "n_reference": len(reals),
                    **fid_kid(split.files, reals, fm, cfg, key_parts, cache_dir, device, progress), **split.metrics,
                    **do_nothing_scores(testset, data_dir, recipe.direction, size, reverse, cfg.batch_size, device)}
            metrics.update({f"{prefix}{k}": v for k, v in part.items()})
            if split.samples:
                save_png(tmp / grid_name, sample_grid(split.samples))
                artifacts.append(out_dir / grid_name)
        metrics.update(inception_sha256=fm.sha256, inception_official=fm.official)
    return Evaluation(metrics, record.get("mlflow_run_id"), artifacts)


def _task_record(model, task: str, recipe, ckpt_dir) -> dict:
    """The checkpoint's record of `task`, checked against what params.yaml says the task is."""
    try:
        record = model.task(task)
    except KeyError as e:
        raise ValueError(f"{ckpt_dir}: {e.args[0]}") from None
    for key in ("mode", "direction", "dataset"):
        if record.get(key) is not None and record[key] != getattr(recipe, key):
            raise ValueError(f"{ckpt_dir}: task {task!r} was trained with {key} {record[key]!r}, params.yaml says "
                             f"{getattr(recipe, key)!r}: re-run `dvc repro train@{task}`")
    return record
