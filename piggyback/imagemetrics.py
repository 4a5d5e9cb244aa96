"""Ground-truth image metrics for paired outputs: L1, PSNR and SSIM (Wang et al. 2004, IEEE TIP 13(4)).

Inputs are batches (N, C, H, W) in the networks' range [-1, 1]; every metric is computed on the [0, 1]
scale (after clamping), in float64, and returned per image, shape (N,), so batches can be concatenated:
- L1: mean |a - b| on [0, 1] (half the value of junyanz's L1 loss, which is taken on [-1, 1]).
- PSNR: 10 log10(1 / MSE), data range 1.0; +inf for identical images.
- SSIM: Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, population (not sample) statistics, mean over
  the valid positions and the channels; equals skimage ``structural_similarity(a, b, data_range=1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0)`` (which crops the border).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit_range(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] in float64, clamped (the image as it would be saved, before quantisation)."""
    return ((x.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference per image on the [0, 1] scale: (N,)."""
    _check_pair(a, b)
    return (to_unit_range(a) - to_unit_range(b)).abs().flatten(1).mean(1)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image in dB, data range 1.0: (N,)."""
    _check_pair(a, b)
    mse = (to_unit_range(a) - to_unit_range(b)).square().flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)  # mse == 0 -> +inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64, device=None) -> Tensor:
    """Normalised 1-D Gaussian taps, (size,): exp(-x² / 2σ²) for x = -(size-1)/2 .. (size-1)/2."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma * sigma))
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter per channel, 'valid' positions only: (N, C, H, W) -> (N, C, H-k+1, W-k+1)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along H
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # along W


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Structural similarity per image, mean over channels and valid window positions: (N,)."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    x, y = to_unit_range(a), to_unit_range(b)
    g = gaussian_window(dtype=x.dtype, device=x.device)
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2  # (K * data range)²
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x = _blur(x * x, g) - mu_x.square()
    var_y = _blur(y * y, g) - mu_y.square()
    cov_xy = _blur(x * y, g) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def image_metrics(fake: Tensor, real: Tensor) -> dict[str, Tensor]:
    """All three per image: {"l1": (N,), "psnr": (N,), "ssim": (N,)} for [-1, 1] batches."""
    return {"l1": l1(fake, real), "psnr": psnr(fake, real), "ssim": ssim(fake, real)}


def mean_psnr(values: Tensor) -> float:
    """Mean of per-image PSNR values, ignoring +inf (identical pairs); nan when all are identical."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan
