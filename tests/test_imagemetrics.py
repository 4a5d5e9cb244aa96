"""piggyback.imagemetrics: L1 / PSNR / SSIM on [-1, 1] batches, scored on the [0, 1] scale."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from piggyback.imagemetrics import gaussian_window, image_metrics, l1, mean_psnr, psnr, ssim


def _batch(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 2 - 1  # [-1, 1]


def _ssim_scipy(a, b):
    """Reference SSIM of one (C, H, W) [0, 1] image pair with scipy's Gaussian filter, border cropped
    (what skimage does with gaussian_weights=True, sigma=1.5, use_sample_covariance=False)."""
    from scipy.ndimage import gaussian_filter

    f = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731  radius 5: 11 taps
    values = []
    for x, y in zip(a, b):
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


def test_identical_images():
    x = _batch(0)
    assert torch.equal(l1(x, x), torch.zeros(2, dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert math.isnan(mean_psnr(psnr(x, x)))


def test_l1_and_psnr_of_a_known_difference():
    x = torch.zeros(1, 3, 16, 16)          # 0.5 on the [0, 1] scale
    y = x + 0.2                            # 0.6: |diff| = 0.1, MSE = 0.01
    assert l1(x, y).item() == pytest.approx(0.1, abs=1e-7)
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-5)
    assert mean_psnr(torch.tensor([20.0, math.inf, 30.0])) == 25.0


def test_ssim_properties():
    x, y = _batch(1), _batch(2)
    s = ssim(x, y)
    torch.testing.assert_close(s, ssim(y, x))   # symmetric
    assert ((s > -1) & (s < 1)).all()
    shifted = ssim(x, (x + 0.2).clamp(-1, 1))   # A constant shift lowers the luminance term only.
    assert (shifted < 1).all() and (shifted > s).all()


def test_ssim_matches_scipy_reference():
    x, y = _batch(3, n=2, size=24), _batch(4, n=2, size=24)
    ours = ssim(x, y)
    for i in range(2):
        a, b = ((x[i].double() + 1) / 2).numpy(), ((y[i].double() + 1) / 2).numpy()
        assert ours[i].item() == pytest.approx(_ssim_scipy(a, b), abs=1e-10)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _batch(5, n=1), _batch(6, n=1)
    a, b = ((x[0].double() + 1) / 2).numpy(), ((y[0].double() + 1) / 2).numpy()
    ref = metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, channel_axis=0)
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-8)


def test_window_and_shapes():
    g = gaussian_window()
    assert g.shape == (11,) and g.sum().item() == pytest.approx(1.0)
    out = image_metrics(_batch(7, n=3), _batch(8, n=3))
    assert {k: v.shape for k, v in out.items()} == {k: (3,) for k in ("l1", "psnr", "ssim")}
    with pytest.raises(ValueError):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        l1(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
