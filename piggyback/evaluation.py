"""Evaluate one learned task, and translate a user's images with any task of a checkpoint.

The protocol is the field's (reference.md 10, DESIGN.md 4): per task, the whole test split translated
and saved as PNG, compared with the real target-domain test images at the same resolution
(data.crop_size) on pool3 features of pytorch-fid's FID Inception: FID (Heusel et al. 2017) and KID
(Bińkowski et al. 2018, unbiased, seeded subsets). Where the true output of each input is known (paired
datasets, the embedded suite) L1, PSNR and SSIM as well. A value computed with Inception weights other
than the official file is never called FID: it is stored under ``fid_nonofficial_weights``.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from . import fid as fidlib
from .checkpoint import load_lifelong
from .config import EvalConfig, MlflowConfig, Params, task_recipe
from .fsutil import atomic_directory, atomic_path, sha256_file
from .imagemetrics import SSIM_WINDOW, l1, mean_psnr, psnr, ssim
from .kid import kid

KID_SEED = 0                        # Fixed, not base.seed: KID subsets are part of the metric's definition.
NONOFFICIAL = "_nonofficial_weights"  # Suffix of values computed with stand-in Inception weights.
# Code (paper): G_A (G: the task's direction), G_B (F: the reverse, CycleGAN tasks only).
DIRECTIONS = {"G_A": ("", "fake_B", "real_B", "grid.png"), "G_B": ("reverse_", "fake_A", "real_A", "grid_reverse.png")}


class FidUnavailableError(RuntimeError):
    """eval.require_fid is set but FID cannot be computed with the official weights; the message says why."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# Inception weights.

@dataclass
class FidModel:
    """The Inception network FID/KID use, or why there is none."""
    net: Optional[nn.Module]            # pytorch-fid's InceptionV3 (pool3), None when unavailable.
    sha256: Optional[str] = None        # Hash of the weights file.
    official: bool = False              # The hash has the official file's prefix: values are FID / KID.
    reason: Optional[str] = None        # Why FID is not reported (no weights, or stand-in weights).


def load_fid_model(fid_weights: Optional[str], require: bool = False, device: Any = None,
                   allow_download: bool = True) -> FidModel:
    """Resolve and load the FID Inception (eval.fid_weights, else the hub cache, else a download).

    Without usable weights the result carries the reason (FidUnavailableError when `require`). A file
    whose hash is not the official one is loaded, with a warning, as stand-in weights: its values are
    stored under ``*_nonofficial_weights`` and FID stays null (with `require` it is an error).
    """
    try:
        path, reason = fidlib.resolve_inception_weights(fid_weights, allow_download=allow_download)
    except FileNotFoundError as e:
        path, reason = None, str(e)
    net = None
    if path is not None:
        try:
            net = fidlib.load_fid_inception(path, device or "cpu")
        except Exception as e:  # noqa: BLE001 - an unreadable or mismatched file means "no FID", with why
            reason = f"cannot load FID Inception weights {path}: {type(e).__name__}: {e}"
    if net is None:
        if require:
            raise FidUnavailableError(f"eval.require_fid is set but FID is unavailable: {reason}")
        return FidModel(None, reason=reason)
    sha = net.weights_sha256
    if fidlib.is_official_sha256(sha):
        return FidModel(net, sha, official=True)
    reason = (f"{path} (sha256 {sha[:12]}...) is not pytorch-fid's FID Inception {fidlib.FID_WEIGHTS_NAME} "
              f"(sha256 prefix {fidlib.FID_WEIGHTS_SHA256_PREFIX}); values computed with it are stored under "
              f"fid{NONOFFICIAL} / kid{NONOFFICIAL}, never as FID / KID")
    if require:
        raise FidUnavailableError(f"eval.require_fid is set but {reason}")
    warnings.warn(reason, stacklevel=2)
    return FidModel(net, sha, official=False, reason=reason)


def reference_features(files: list[Path], cache_dir: Union[str, Path], key_parts: dict, model: nn.Module,
                       batch_size: int = 50, device: Any = None, progress: bool = True) -> np.ndarray:
    """Inception features (N, 2048) of real images, cached as ``<cache_dir>/<key>.npz``.

    KID needs the features themselves, not only their mean and covariance (what `fid.reference_stats`
    keeps), so the features are cached; the key is `fid.stats_key` of the images' bytes, the weights'
    hash and `key_parts` (dataset, split, domain, resolution) plus ``content: features``.
    """
    key = fidlib.stats_key((sha256_file(p) for p in files), model.weights_sha256, {**key_parts, "content": "features"})
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                if str(f["key"]) == key:
                    return f["features"]
        except (OSError, ValueError, KeyError):
            pass  # An unreadable cache file is recomputed and replaced.
    feats = fidlib.extract_features(files, model, batch_size, device, progress)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, features=feats, key=key, weights_sha256=model.weights_sha256,
                 parts=json.dumps(key_parts, sort_keys=True))
    return feats


def fid_kid(fake_files: list[Path], real_files: list[Path], fm: FidModel, cfg: EvalConfig, key_parts: dict,
            cache_dir: Union[str, Path], device: Any = None, progress: bool = True) -> dict[str, Any]:
    """{"fid", "fid_reason", "kid", "kid_std", "kid_subset_size", "kid_subsets"} for translations vs reals."""
    out: dict[str, Any] = {"fid": None, "fid_reason": fm.reason, "kid": None, "kid_std": None,
                           "kid_subset_size": None, "kid_subsets": None}
    if fm.net is None:
        return out
    if min(len(fake_files), len(real_files)) < 2:
        out["fid_reason"] = f"FID / KID need >= 2 images per set, got {len(fake_files)} and {len(real_files)}"
        return out
    real = reference_features(real_files, cache_dir, key_parts, fm.net, cfg.batch_size, device, progress)
    fake = fidlib.extract_features(fake_files, fm.net, cfg.batch_size, device, progress)
    k = kid(fake, real, subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size, seed=KID_SEED)
    values = {"fid": fidlib.fid_from_features(fake, real), "kid": k.mean, "kid_std": k.std}
    out.update(kid_subset_size=k.subset_size, kid_subsets=k.subsets)
    if fm.official:
        out.update(values)
    else:
        out.update({f"{name}{NONOFFICIAL}": v for name, v in values.items()})
    return out


# ----------------------------------------------------------------------------------------------
# Translation.

def to_uint8(x: Tensor) -> np.ndarray:
    """Network outputs in [-1, 1], (N, C, H, W) -> the PNG pixels, uint8 (N, H, W, C), rounded."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(path: Path, pixels: np.ndarray) -> Path:
    """Write one uint8 (H, W, 1|3) image as PNG, atomically."""
    img = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def sample_grid(rows: list[Tensor]) -> np.ndarray:
    """Rows of (k, C, H, W) images in [-1, 1] (input / translation / truth) -> one uint8 (H, W, 3) image."""
    from torchvision.utils import make_grid

    rows = [r.float().cpu().expand(-1, 3, -1, -1) if r.shape[1] == 1 else r.float().cpu() for r in rows]
    grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=2, pad_value=1.0)  # (3, H, W)
    return to_uint8(grid[None])[0]


@dataclass
class SplitResult:
    """What translating one test split gives: written files, ground-truth metrics, grid samples."""
    files: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)   # l1, psnr, ssim (None + reasons without truth)
    samples: list[Tensor] = field(default_factory=list)     # grid rows: inputs, outputs(, truths)


@torch.no_grad()
def translate_split(net: nn.Module, testset, out_dir: Optional[Path], batch_size: int = 50, device: Any = None,
                    grid_images: int = 0, progress: bool = True) -> SplitResult:
    """Run `net` over a `data.datasets.TestSet`: PNGs ``<out_dir>/<stem>.png`` (None: write nothing), means
    of L1 / PSNR / SSIM against the true outputs when every item has one, the first `grid_images` samples."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data.datasets import collate_test

    device = torch.device(device) if device is not None else default_device()
    names = [name for _, _, name in testset.items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"test images with the same file stem would overwrite each other: {dup[:5]}")
    net = net.to(device).eval()
    res, per_image = SplitResult(), {"l1": [], "psnr": [], "ssim": []}
    grid = {"A": [], "fake": [], "B": []}
    loader = DataLoader(testset, batch_size=batch_size, shuffle=False, collate_fn=collate_test)
    for batch in tqdm(loader, desc="translate", unit="batch", disable=None if progress else True):
        fake = net(batch["A"].to(device)).float().cpu()                 # (B, C, H, W) in [-1, 1]
        if out_dir is not None:
            for name, pixels in zip(batch["name"], to_uint8(fake)):
                res.files.append(save_png(out_dir / f"{name}.png", pixels))
        if testset.has_truth:
            truth = batch["B"]
            per_image["l1"].append(l1(fake, truth))
            per_image["psnr"].append(psnr(fake, truth))
            if min(truth.shape[-2:]) >= SSIM_WINDOW:
                per_image["ssim"].append(ssim(fake, truth))
        room = grid_images - sum(len(x) for x in grid["A"])
        if room > 0:
            grid["A"].append(batch["A"][:room])
            grid["fake"].append(fake[:room])
            if batch["B"] is not None:
                grid["B"].append(batch["B"][:room])
    res.metrics = _gt_means(per_image, testset)
    if grid["A"]:
        res.samples = [torch.cat(grid[k]) for k in ("A", "fake", "B") if grid[k]]
    return res


def _gt_means(per_image: dict[str, list[Tensor]], testset) -> dict[str, Any]:
    """Means of per-image ground-truth metrics, None with a reason where they cannot be computed."""
    if not testset.has_truth or not per_image["l1"]:
        missing = sum(t is None for _, t, _ in testset.items)
        return {"l1": None, "psnr": None, "ssim": None,
                "gt_reason": f"no true output for {missing} of {len(testset)} test inputs (unpaired data without "
                             f"test<domain>_truth/): L1 / PSNR / SSIM need pairs"}
    out: dict[str, Any] = {"l1": float(torch.cat(per_image["l1"]).mean()), "gt_reason": None}
    out["psnr"] = mean_psnr(torch.cat(per_image["psnr"]))
    if math.isnan(out["psnr"]):
        out["psnr"], out["psnr_reason"] = None, "every translation equals its truth (PSNR is infinite)"
    if per_image["ssim"]:
        out["ssim"] = float(torch.cat(per_image["ssim"]).mean())
    else:
        out["ssim"], out["ssim_reason"] = None, f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}"
    return out


def write_reference_images(images: Iterable[np.ndarray], out_dir: Path) -> list[Path]:
    """The real target-domain images as evaluated (resized to the evaluation size): ``<out_dir>/0000.png``..."""
    return [save_png(out_dir / f"{i:04d}.png", a if a.ndim == 3 else a[..., None]) for i, a in enumerate(images)]


# ----------------------------------------------------------------------------------------------
# One task.

@dataclass
class Evaluation:
    metrics: dict[str, Any]             # The flat dict written to metrics/tasks/<task>.json and logged.
    run_id: Optional[str]               # The task's training run in MLflow (task record `mlflow_run_id`).
    artifacts: list[Path]               # Sample grids, in the final output folder.


def evaluate_task(params: Params, task: str, ckpt_dir: Union[str, Path], data_dir: Union[str, Path],
                  out_dir: Union[str, Path], cache_dir: Union[str, Path], device: Any = None,
                  progress: bool = True, fid_model: Optional[FidModel] = None) -> Evaluation:
    """Translate the task's test split (G_A; and G_B for CycleGAN tasks, keys prefixed ``reverse_``) and score it.

    Args:
        params: validated params.yaml (reads eval, data.crop_size, tasks.<task>).
        task: task id; the checkpoint `ckpt_dir` must hold it with the mode/direction/dataset params give.
        data_dir: the task's prepared dataset. out_dir: replaced atomically with fake_B/, real_B/, grid.png
            (and fake_A/, real_A/, grid_reverse.png). cache_dir: cached real-image Inception features.
        fid_model: an already loaded `FidModel` (tests); default `load_fid_model(eval.fid_weights, ...)`.
    Raises:
        FidUnavailableError (eval.require_fid without official weights), CheckpointError, ValueError.
    """
    from .data.datasets import TestSet, target_images

    cfg, size, recipe = params.eval, params.data.crop_size, task_recipe(params, task)
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
                    **fid_kid(split.files, reals, fm, cfg, key_parts, cache_dir, device, progress), **split.metrics}
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


def log_evaluation(cfg: MlflowConfig, run_id: Optional[str], metrics: dict[str, Any],
                   artifacts: Iterable[Path] = ()) -> str:
    """Log `metrics` into the task's training run: numbers as metrics, text as ``eval.*`` tags; grids as
    artifacts. Returns a one-line note of what happened (skipped, logged, or why logging failed)."""
    if not cfg.enabled:
        return "MLflow disabled (mlflow.enabled: false): not logged"
    if not run_id:
        return "the task record has no mlflow_run_id: not logged to MLflow"
    from .tracking import open_run

    numbers = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    tags = {f"eval.{k}": v for k, v in metrics.items() if isinstance(v, (str, bool))}
    try:
        tracker = open_run(cfg, rank=0, run_name="", run_id=run_id)
    except Exception as e:  # noqa: BLE001 - the JSON file is the record; a tracking failure is only a warning
        return f"MLflow: could not reopen run {run_id} ({type(e).__name__}: {e}): not logged"
    try:
        tracker.log_metrics(numbers)
        tracker.set_tags(tags)
        for path in artifacts:
            tracker.log_artifact(path, "evaluation")
    except Exception as e:  # noqa: BLE001
        return f"MLflow: logging into run {run_id} failed ({type(e).__name__}: {e})"
    finally:
        tracker.end("FINISHED")  # reopening marked the (finished) training run RUNNING: restore its status
    return f"logged {len(numbers)} metrics into MLflow run {run_id}"


# ----------------------------------------------------------------------------------------------
# Translating a user's folder.

def input_multiple(netG: str) -> tuple[int, int]:
    """(multiple, minimum) an input side must satisfy for the output to have the input's size.

    ResNet: two stride-2 convs then two stride-2 transposed convs (multiple of 4; the 1/4 map must
    take the blocks' reflection padding, so at least 8). U-Net: num_downs halvings (2^7 / 2^8).
    """
    if netG.startswith("resnet_"):
        return 4, 8
    downs = {"unet_128": 7, "unet_256": 8}[netG]
    return 2 ** downs, 2 ** downs


def _load_input(path: Path, channels: int) -> Tensor:
    """A user's image -> (1, C, H, W) in [-1, 1]; EXIF orientation applied, converted to RGB or L."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("L" if channels == 1 else "RGB")
        arr = np.array(img, dtype=np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr                           # (H, W, C)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float().div_(127.5).sub_(1.0)


def translate_folder(checkpoint: Union[str, Path], task: str, input_dir: Union[str, Path],
                     output_dir: Union[str, Path], which: str = "G_A", device: Any = None) -> list[Path]:
    """Translate every image of `input_dir` with `task` of a checkpoint: ``<output_dir>/<stem>.png``.

    Reads the files directly in `input_dir` (not sub-folders) with an image extension, in any case
    (``.PNG``, ``.JPG``, ``.jpeg``, ...). Images keep their size: a size the generator cannot map back onto
    itself (ResNet: sides multiples of 4, at least 8; U-Net 256: multiples of 256) is an error naming the
    files, raised before anything is written; images are not resized, so the pixels are the user's.
    `which`: "G_A" (the task's direction) or "G_B" (the reverse, CycleGAN tasks). Returns the written paths.
    """
    from tqdm.auto import tqdm

    from .data.prepare import is_image

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input_dir}: no such folder")
    if output_dir.resolve() == input_dir.resolve():
        raise ValueError(f"--output must differ from --input ({input_dir}): PNG inputs would be overwritten")
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and is_image(p))
    if not files:
        raise ValueError(f"--input {input_dir}: no images (png, jpg, jpeg, ... in any case) directly in this folder")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = sorted({p.name for p in files if stems.count(p.stem) > 1})
        raise ValueError(f"--input {input_dir}: several files would be written to the same <stem>.png: {dup[:6]}")
    model = load_lifelong(checkpoint)
    try:
        net = model.materialize(task, which)
    except KeyError as e:
        raise ValueError(f"{checkpoint}: {e.args[0]}") from None
    cfg = model.config
    multiple, minimum = input_multiple(cfg.netG)
    bad = []
    for p in files:
        try:
            with Image.open(p) as img:
                w, h = ImageOps.exif_transpose(img).size
        except (OSError, Image.DecompressionBombError) as e:   # a bomb: too many pixels to decode safely
            raise ValueError(f"{p}: not a readable image ({e})") from e
        if w % multiple or h % multiple or min(w, h) < minimum:
            bad.append(f"{p.name} ({w}x{h})")
    if bad:
        raise ValueError(f"{cfg.netG} needs width and height multiples of {multiple} (at least {minimum}); resize "
                         f"these images first: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    device = torch.device(device) if device is not None else default_device()
    net = net.to(device).eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for p in tqdm(files, desc=f"translate {task}", unit="img", disable=None):
            x = _load_input(p, cfg.input_nc).to(device)                      # (1, C, H, W)
            y = net(x)
            if y.shape[-2:] != x.shape[-2:]:  # a safety net behind input_multiple
                raise ValueError(f"{p}: {cfg.netG} turned {tuple(x.shape[-2:])} into {tuple(y.shape[-2:])}")
            written.append(save_png(output_dir / f"{p.stem}.png", to_uint8(y)[0]))
    return written
