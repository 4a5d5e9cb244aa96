"""Test helpers for the FID tests: a random-weight FID Inception file, small PNG folders, pytorch-fid's CLI.

The random weights exercise the plumbing only; numbers computed with them are never FID.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from piggyback.fid import FID_WEIGHTS_NAME


def random_fid_inception_state_dict(seed: int = 0) -> dict:
    """State dict of pytorch-fid's FID Inception architecture (``fid_inception_v3``) with random weights.

    ``fid_inception_v3`` builds torchvision's Inception3, patches the FID blocks in place, then loads
    ``load_state_dict_from_url(...)``: we keep the built network and hand it its own state dict. Default
    init leaves pool3 features near 1e-8, so BatchNorm statistics are then set from one pass over smooth
    random images, which gives features of order 1 (a meaningful scale for 1e-3 comparisons).
    """
    import pytorch_fid.inception as pfi

    torch.manual_seed(seed)
    built = {}
    original_build, original_load = pfi._inception_v3, pfi.load_state_dict_from_url

    def build(*args, **kwargs):
        built["net"] = original_build(*args, **kwargs)
        return built["net"]

    pfi._inception_v3 = build
    pfi.load_state_dict_from_url = lambda *args, **kwargs: built["net"].state_dict()
    try:
        net = pfi.fid_inception_v3()
    finally:
        pfi._inception_v3, pfi.load_state_dict_from_url = original_build, original_load
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # Cumulative average: one batch sets the statistics exactly.
    net.train()
    with torch.no_grad():
        net(smooth_images(8, 299, seed=seed + 1000) * 2 - 1)
    for bn in norms:
        bn.momentum = 0.1
    return net.eval().state_dict()


def write_random_inception(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_fid_inception_state_dict(seed), path)
    return path


def hub_file(torch_home: Path) -> Path:
    """Where torch hub looks for the FID weights under TORCH_HOME."""
    return torch_home / "hub" / "checkpoints" / FID_WEIGHTS_NAME


def smooth_images(n: int, size: int, seed: int = 0, coarse: int = 6, brightness: float = 1.0) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: bilinearly upsampled coarse noise (varied, image-like content)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, coarse, coarse, generator=g) * brightness
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def write_png_folder(folder: Path, n: int, size: int = 64, seed: int = 0, **kwargs) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (smooth_images(n, size, seed, **kwargs) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, a in enumerate(arrays):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(np.ascontiguousarray(a)).save(paths[-1])
    return paths


def pytorch_fid_cli(dir1: Path, dir2: Path, torch_home: Path, batch_size: int) -> float:
    """``python -m pytorch_fid DIR1 DIR2 --device cpu`` with TORCH_HOME pointing at our weights file."""
    env = dict(os.environ, TORCH_HOME=str(torch_home))
    out = subprocess.run([sys.executable, "-m", "pytorch_fid", str(dir1), str(dir2), "--device", "cpu",
                          "--batch-size", str(batch_size), "--num-workers", "0"],
                         env=env, capture_output=True, text=True, check=True)
    match = re.search(r"FID:\s+(\S+)", out.stdout)
    assert match, out.stdout + out.stderr
    return float(match.group(1))
