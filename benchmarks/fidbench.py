"""piggyback.fid against pytorch-fid: feature extraction throughput and the Fréchet distance at 2048-d.

Timing only. The FID Inception weights cannot be downloaded here, so the network is pytorch-fid's FID
Inception architecture with random weights (BatchNorm statistics set from one pass so activations have a
sane scale, which keeps the arithmetic free of denormals). A number computed with it is not an FID.
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .core import interleave


@contextlib.contextmanager
def _random_fid_inception_build():
    """While active, pytorch-fid's `fid_inception_v3()` keeps its own random initialisation.

    pytorch-fid builds torchvision's Inception3, swaps in its FID blocks, then loads the state dict that
    `load_state_dict_from_url` returns. We note the network it built and hand that network's own state
    dict back as "the download", so the load is an identity and nothing is fetched.
    """
    import pytorch_fid.inception as pfi

    seen = []
    real_build, real_fetch = pfi._inception_v3, pfi.load_state_dict_from_url

    def build_and_note(*args, **kwargs):
        seen.append(real_build(*args, **kwargs))
        return seen[-1]

    pfi._inception_v3 = build_and_note
    pfi.load_state_dict_from_url = lambda *args, **kwargs: seen[-1].state_dict()
    try:
        yield
    finally:
        pfi._inception_v3, pfi.load_state_dict_from_url = real_build, real_fetch


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: coarse uniform noise upsampled bicubically (clamped), image-like."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def write_random_inception(path: Path, seed: int = 0) -> Path:
    """Save a random-weight FID Inception state dict (loadable by `piggyback.fid.load_fid_inception`)."""
    import pytorch_fid.inception as pfi

    torch.manual_seed(seed)
    with _random_fid_inception_build():
        net = pfi.fid_inception_v3()           # torchvision Inception3 with the FID blocks, random init
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None                     # cumulative average: the calibration batch sets the stats
    net.train()
    with torch.no_grad():
        net(smooth_images(4, 299, seed + 1) * 2 - 1)
    state = net.eval().state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_pngs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (smooth_images(n, size, seed) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, a in enumerate(arrays):
        paths.append(folder / f"img_{i:04d}.png")
        Image.fromarray(np.ascontiguousarray(a)).save(paths[-1])
    return paths


class StubInception(torch.nn.Module):
    """A tiny stand-in with InceptionV3's output convention ([(B, 2048, 1, 1)]), for plumbing tests only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2048, 4, stride=4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.relu(self.conv(x * 2 - 1)).mean((2, 3), keepdim=True)]


def features_benchmark(workdir: Path, n_images: int, size: int, batch: int, device: torch.device,
                       warmup: int, repeats: int, stub: bool = False) -> dict:
    """Images/s of `piggyback.fid.extract_features` vs `pytorch_fid.fid_score.get_activations`.

    Same model object, same PNG files, same batch size, data loading in the main process for both
    (``num_workers=0``), so the comparison is of the two pipelines around one network. `stub` swaps the
    Inception for a one-layer stand-in (tests of the plumbing: no meaningful speed).
    """
    from pytorch_fid.fid_score import get_activations

    from piggyback import fid

    files = write_pngs(workdir / "images", n_images, size)
    if stub:
        weights, model = None, StubInception().eval().to(device)
    else:
        weights = write_random_inception(workdir / "random_fid_inception.pth")
        model = fid.load_fid_inception(weights, device)
    names = [str(f) for f in files]
    out = {}

    def ours():
        out["ours"] = fid.extract_features(files, model, batch, device, progress=False)

    def theirs():
        with contextlib.redirect_stderr(io.StringIO()):      # its tqdm bar
            out["pytorch_fid"] = get_activations(names, model, batch, 2048, device, 0)

    timings = interleave({"pytorch_fid": theirs, "ours": ours}, warmup, repeats, device, "features")
    diff = float(np.max(np.abs(out["ours"] - out["pytorch_fid"])))
    scale = float(np.max(np.abs(out["pytorch_fid"]))) or 1.0
    for t in timings.values():
        t["images_per_s"] = n_images / t["median_s"]
    return {
        "images": n_images, "image_size": size, "batch_size": batch, "num_workers": 0,
        "timings": timings,
        "ours_images_per_s": timings["ours"]["images_per_s"],
        "pytorch_fid_images_per_s": timings["pytorch_fid"]["images_per_s"],
        "feature_speedup": timings["pytorch_fid"]["median_s"] / timings["ours"]["median_s"],
        "features_max_abs_diff": diff, "features_max_rel_diff": diff / scale,
        "model": "stub (plumbing only)" if stub else "pytorch-fid FID Inception, random weights (timing only)",
        "folder": str(files[0].parent), **({"weights": str(weights)} if weights else {}),
    }


def realistic_stats(dims: int, samples: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(mu1, sigma1, mu2, sigma2) of two correlated, non-negative feature sets, like pool3 activations.

    Features are ReLU(z A + b) with a random mixing matrix whose column scales decay (a spread of
    eigenvalues over several decades, as real Inception covariances have); the second set is shifted
    and slightly re-mixed. Full rank when samples > dims.
    """
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(1.0 + np.arange(dims))
    mix = rng.standard_normal((dims, dims)) * scales / np.sqrt(dims)
    bias = rng.uniform(0.0, 0.3, dims)

    def stats(z: np.ndarray, a: np.ndarray, b: np.ndarray):
        f = np.maximum(z @ a + b, 0.0)
        return f.mean(0), np.cov(f, rowvar=False)

    mu1, s1 = stats(rng.standard_normal((samples, dims)), mix, bias)
    mix2 = mix + 0.1 * rng.standard_normal((dims, dims)) * scales / np.sqrt(dims)
    mu2, s2 = stats(rng.standard_normal((samples, dims)), mix2, bias + 0.05)
    return mu1, s1, mu2, s2


def frechet_benchmark(workdir: Path, dims: int, samples: int, ours_repeats: int, theirs_repeats: int) -> dict:
    """`piggyback.fid.frechet_distance` vs pytorch-fid's `calculate_frechet_distance` (scipy sqrtm).

    The slow reference is timed `theirs_repeats` times, ours `ours_repeats` times, alternating (after
    one untimed call of ours, which loads LAPACK's code paths); both see the same float64 inputs.
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    from piggyback.fid import frechet_distance

    start = time.perf_counter()
    mu1, s1, mu2, s2 = realistic_stats(dims, samples)
    gen_s = time.perf_counter() - start
    stats_path = workdir / "frechet_stats.npz"
    np.savez(stats_path, mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2)
    frechet_distance(mu1, s1, mu2, s2)
    samples_ours, samples_theirs, value = [], [], {}
    for r in range(max(ours_repeats, theirs_repeats)):
        if r < ours_repeats:
            t0 = time.perf_counter()
            value["ours"] = frechet_distance(mu1, s1, mu2, s2)
            samples_ours.append(time.perf_counter() - t0)
        if r < theirs_repeats:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)   # scipy's sqrtm(disp=...) notice
                value["pytorch_fid"] = float(calculate_frechet_distance(mu1, s1, mu2, s2))
            samples_theirs.append(time.perf_counter() - t0)
        print(f"    frechet round {r + 1}: ours {samples_ours[-1]:.2f} s"
              + (f", pytorch-fid {samples_theirs[-1]:.2f} s" if r < theirs_repeats else ""), flush=True)
    med = lambda s: float(np.median(s))  # noqa: E731
    rel = abs(value["ours"] - value["pytorch_fid"]) / abs(value["pytorch_fid"])
    return {
        "dims": dims, "samples": samples, "stats_generation_s": gen_s, "stats": str(stats_path),
        "timings": {
            "ours": {"median_s": med(samples_ours), "samples_s": samples_ours, "repeats": len(samples_ours)},
            "pytorch_fid": {"median_s": med(samples_theirs), "samples_s": samples_theirs,
                            "repeats": len(samples_theirs)},
        },
        "value_ours": value["ours"], "value_pytorch_fid": value["pytorch_fid"],
        "frechet_rel_diff": rel,
        "frechet_speedup": med(samples_theirs) / med(samples_ours),
    }
