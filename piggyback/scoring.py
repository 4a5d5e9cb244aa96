"""Metrics of one translated test split: FID / KID against the real target images, and L1 / PSNR / SSIM
against the true outputs where they are known.

FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018, unbiased, seeded subsets) are computed on pool3
features of pytorch-fid's FID Inception at the evaluation resolution. A value computed with Inception
weights other than the official file is never called FID: it is stored under ``fid_nonofficial_weights``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import fid as fidlib
from .config import EvalConfig
from .imagemetrics import SSIM_WINDOW, l1, mean_psnr, psnr, ssim
from .kid import kid
from .progress import progress_bar
from .translate import default_device, run_generator, save_png, to_uint8

KID_SEED = 0                        # Fixed, not base.seed: KID subsets are part of the metric's definition.
NONOFFICIAL = "_nonofficial_weights"  # Suffix of values computed with stand-in Inception weights.


class FidUnavailableError(RuntimeError):
    """eval.require_fid is set but FID cannot be computed with the official weights; the message says why."""


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


def fid_kid(fake_files: list[Path], real_files: list[Path], fm: FidModel, cfg: EvalConfig, key_parts: dict,
            cache_dir: Union[str, Path], device: Any = None, progress: bool = True) -> dict[str, Any]:
    """{"fid", "fid_reason", "kid", "kid_std", "kid_subset_size", "kid_subsets"} for translations vs reals.

    The reals' features come from `fid.reference_features` (cached per dataset, split, domain, resolution).
    """
    out: dict[str, Any] = {"fid": None, "fid_reason": fm.reason, "kid": None, "kid_std": None,
                           "kid_subset_size": None, "kid_subsets": None}
    if fm.net is None:
        return out
    if min(len(fake_files), len(real_files)) < 2:
        out["fid_reason"] = f"FID / KID need >= 2 images per set, got {len(fake_files)} and {len(real_files)}"
        return out
    real = fidlib.reference_features(real_files, cache_dir, key_parts, fm.net, cfg.batch_size, device, progress)
    fake = fidlib.extract_features(fake_files, fm.net, cfg.batch_size, device, progress)
    k = kid(fake, real, subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size, seed=KID_SEED)
    values = {"fid": fidlib.fid_from_features(fake, real), "kid": k.mean, "kid_std": k.std}
    out.update(kid_subset_size=k.subset_size, kid_subsets=k.subsets)
    if fm.official:
        out.update(values)
    else:
        out.update({f"{name}{NONOFFICIAL}": v for name, v in values.items()})
    return out


@dataclass
class SplitResult:
    """What translating one test split gives: written files, ground-truth metrics, grid samples."""
    files: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)   # l1, psnr, ssim (None + reasons without truth)
    samples: list[Tensor] = field(default_factory=list)     # grid rows: inputs, outputs(, truths)


def translate_split(net: nn.Module, testset, out_dir: Optional[Path], batch_size: int = 50, device: Any = None,
                    grid_images: int = 0, progress: bool = True) -> SplitResult:
    """Run `net` over a `data.datasets.TestSet`: PNGs ``<out_dir>/<stem>.png`` (None: write nothing), means
    of L1 / PSNR / SSIM against the true outputs when every item has one, the first `grid_images` samples."""
    from torch.utils.data import DataLoader

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
    bar = progress_bar(len(testset), "translate", "img", enabled=progress)
    for batch in loader:
        fake = run_generator(net, batch["A"])                               # (B, C, H, W) in [-1, 1]
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
        bar.update(len(batch["name"]))
    bar.close()
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
