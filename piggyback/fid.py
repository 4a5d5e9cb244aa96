"""Fréchet Inception Distance (Heusel et al. 2017) with pytorch-fid's FID Inception, loaded from a local file.

Features and preprocessing match `python -m pytorch_fid` (mseitzer/pytorch-fid 0.3.0): PIL ``convert('RGB')``,
``ToTensor`` to [0, 1], the network's own bilinear resize to 299 and ``2x - 1``, pool3 (2048-d) in float64.
The Fréchet trace term uses a symmetric eigendecomposition instead of ``scipy.linalg.sqrtm`` (same value,
several times faster). An FID value needs a weights *file*: there is no fallback to other weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .fsutil import atomic_path, sha256_file

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# torch hub names files <name>-<first 8 hex digits of their sha256>; the full hash of the official file is
# not known offline, so a download is checked against this prefix and its full hash recorded beside it.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FEATURE_DIMS = 2048
# pytorch-fid's IMAGE_EXTENSIONS (non-recursive glob, lower case).
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
STATS_FORMAT = 1  # Bump when the cached statistics change meaning.

ImageSource = Union[Tensor, str, os.PathLike, Iterable[Any]]
_BUILD_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------
# Weights.

def hub_weights_path() -> Path:
    """Where torch hub (and so pytorch-fid) caches the weights: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def is_official_sha256(sha256: str) -> bool:
    """Whether a weights hash has the official file's hub prefix (a necessary, not sufficient, check)."""
    return sha256.startswith(FID_WEIGHTS_SHA256_PREFIX)


def _cache_problem(path: Path) -> Optional[str]:
    """Why the hub-cache file cannot be trusted, or None when it passes the hash checks."""
    sha = sha256_file(path)
    if not is_official_sha256(sha):
        return (f"{path} has sha256 {sha}, not the official prefix {FID_WEIGHTS_SHA256_PREFIX}; "
                f"remove it or set eval.fid_weights to a verified file")
    record = path.with_name(path.name + ".sha256")
    if record.is_file() and record.read_text().split()[0] != sha:
        return f"{path} has sha256 {sha}, but {record} recorded {record.read_text().split()[0]} at download"
    return None


def resolve_inception_weights(path_from_params: Optional[str] = None,
                              allow_download: bool = True) -> tuple[Optional[Path], Optional[str]]:
    """Find the FID Inception weights: (path, None), or (None, reason) when there are none.

    Order: `path_from_params` (eval.fid_weights; must exist: a missing file raises FileNotFoundError),
    then the torch hub cache, then a download of pytorch-fid's release file into the hub cache, checked
    against the hash prefix in its name; its full sha256 is written to ``<file>.sha256`` at download and
    checked on later runs. A params path is taken as given: `load_fid_inception` records its hash.
    """
    if path_from_params:
        path = Path(path_from_params).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"eval.fid_weights is {path_from_params!r}, but {path} does not exist")
        return path, None
    cached = hub_weights_path()
    if cached.is_file():
        problem = _cache_problem(cached)
        return (cached, None) if problem is None else (None, problem)
    reason = f"no FID Inception weights at {cached}"
    if not allow_download:
        return None, reason + " (downloads disabled)"
    from pytorch_fid.inception import FID_WEIGHTS_URL

    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Writes to a temporary file, checks the prefix, then moves it into place.
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix=FID_WEIGHTS_SHA256_PREFIX)
    except Exception as e:  # Any failure (offline, HTTP, hash) means "no FID", with the reason.
        return None, f"{reason}; download from {FID_WEIGHTS_URL} failed: {type(e).__name__}: {e}"
    sha = sha256_file(cached)
    with atomic_path(cached.with_name(cached.name + ".sha256")) as tmp:
        tmp.write_text(f"{sha}  {cached.name}\n")
    return cached, None


def load_fid_inception(weights_path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """pytorch-fid's ``InceptionV3([3])`` (FID Inception, pool3) with the state dict of a local file.

    pytorch-fid has no local-path option: its module-level ``load_state_dict_from_url`` is swapped, while
    the network is built, for a function returning our ``torch.load(weights_only=True)`` dict, which
    ``fid_inception_v3`` then loads strictly. The model carries ``weights_sha256`` and ``weights_path``.
    """
    import pytorch_fid.inception as pfi

    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights {path} do not exist")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    with _BUILD_LOCK:
        original = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            model = pfi.InceptionV3(output_blocks=[pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIMS]],
                                    use_fid_inception=True)
        finally:
            pfi.load_state_dict_from_url = original
    model.weights_sha256 = sha256_file(path)
    model.weights_path = str(path)
    return model.eval().to(device)


def _require_weights(model: nn.Module) -> str:
    sha = getattr(model, "weights_sha256", None)
    if not isinstance(sha, str):
        raise ValueError("FID needs a model from load_fid_inception(weights file); this one has no weights hash")
    return sha


# ----------------------------------------------------------------------------------------------
# Features.

def image_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """The images pytorch-fid reads from a folder: sorted, non-recursive, its extensions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    return sorted(p for ext in IMAGE_EXTENSIONS for p in folder.glob(f"*.{ext}"))


def _to_tensor(item: Any) -> Tensor:
    """One image -> float (3, H, W) in [0, 1], as pytorch-fid's ImagePathDataset + ToTensor do."""
    from torchvision.transforms import functional as TF

    if isinstance(item, Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W), got {tuple(item.shape)}")
        return item.float()
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            return TF.to_tensor(img.convert("RGB"))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 HxWx3, got {item.dtype}")
        item = Image.fromarray(item)
    if isinstance(item, Image.Image):
        return TF.to_tensor(item.convert("RGB"))
    raise TypeError(f"unsupported image type {type(item).__name__}")


def _batches(images: ImageSource, batch_size: int) -> Iterator[Tensor]:
    """(B, 3, H, W) batches in input order; a change of image size starts a new batch."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    batch: list[Tensor] = []
    for item in images:
        x = _to_tensor(item)
        if batch and x.shape != batch[0].shape:
            yield torch.stack(batch)
            batch = []
        batch.append(x)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def extract_features(images: ImageSource, model: nn.Module, batch_size: int = 50,
                     device: Union[str, torch.device, None] = None, progress: bool = True) -> np.ndarray:
    """Pool3 features, (N, 2048) float64, of images in [0, 1].

    `images`: a float tensor (N, 3, H, W) in [0, 1]; a folder (read like pytorch-fid); or an iterable of
    file paths, PIL images, uint8 HxWx3 arrays or (3, H, W) tensors. Sizes may differ (images of one size
    share a batch; the model resizes to 299 itself). With equal sizes the batches are pytorch-fid's.
    """
    if isinstance(images, (str, os.PathLike)):
        images = image_files(images)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total = len(images) if hasattr(images, "__len__") else None
    from .progress import progress_bar

    model.eval()
    feats = []
    with progress_bar(total, "inception features", "img", enabled=progress) as bar:
        for batch in _batches(images, batch_size):
            # Cheap guard against generator outputs in [-1, 1] passed without conversion.
            if batch.min() < -1e-6 or batch.max() > 1 + 1e-6:
                raise ValueError("images must be in [0, 1]; convert [-1, 1] outputs with (x + 1) / 2")
            # Contiguous (NCHW) like pytorch-fid's batches: a channels-last view takes other conv kernels.
            out = model(batch.contiguous().to(device))[0]        # (B, 2048, 1, 1)
            feats.append(out.flatten(1).double().cpu().numpy())  # (B, 2048)
            bar.update(len(batch))
    if not feats:
        raise ValueError("no images")
    return np.concatenate(feats)


# ----------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance.

class FeatureStats:
    """Running mean and unbiased covariance (like ``np.cov``) of feature batches, in float64.

    Sums are taken about the first row seen (a shift that leaves the covariance unchanged and keeps
    the sum of outer products free of cancellation when the mean is large).
    """

    def __init__(self, dims: int = FEATURE_DIMS) -> None:
        self.dims = dims
        self.count = 0
        self.shift: Optional[np.ndarray] = None
        self.sum = np.zeros(dims, dtype=np.float64)
        self.sum_outer = np.zeros((dims, dims), dtype=np.float64)

    def append(self, x: Union[np.ndarray, Tensor]) -> None:
        if isinstance(x, Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dims)  # (B, d)
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = x[0].copy()
        x = x - self.shift
        self.count += len(x)
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x

    @classmethod
    def from_features(cls, x: Union[np.ndarray, Tensor]) -> "FeatureStats":
        stats = cls(dims=x.shape[1])
        stats.append(x)
        return stats

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features")
        return self.shift + self.sum / self.count

    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs >= 2 samples, got {self.count}")
        m = self.sum / self.count
        return (self.sum_outer - self.count * np.outer(m, m)) / (self.count - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr sqrt(S1^½ S2 S1^½), for Gaussians N(mu1, S1), N(mu2, S2).

    tr sqrt(S1 S2) equals the trace term above (same eigenvalues). With S1 = R Rᵀ, the eigenvalues of
    Rᵀ S2 R (symmetric) are those of S1 S2, so one Cholesky factorisation and one symmetric eigenvalue
    solve replace scipy's sqrtm (5-10x faster at 2048-d; float64 LAPACK through torch). A rank-deficient
    S1 (fewer samples than dimensions) has no Cholesky factor: R = V W^½ from its eigendecomposition then.
    Tiny negative eigenvalues (round-off) are clipped at 0; identical sets may give -1e-12.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    s1, s2 = torch.from_numpy((sigma1 + sigma1.T) / 2), torch.from_numpy(sigma2)
    root, info = torch.linalg.cholesky_ex(s1)             # (d, d) lower: root rootᵀ = S1
    if info.item() != 0:
        w, v = torch.linalg.eigh(s1)
        root = v * w.clamp(min=0).sqrt()                  # V W^½
    inner = root.T @ s2 @ root                            # similar to S1^½ S2 S1^½
    lam = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = lam.clamp(min=0).sqrt().sum().item()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of (N, d) features."""
    stats = FeatureStats.from_features(np.asarray(feats))
    return stats.mean(), stats.cov()


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two (N, d) feature sets (N >= 2 each).

    With fewer than d + 1 samples the covariances are rank-deficient and the value is biased upwards.
    """
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


# ----------------------------------------------------------------------------------------------
# Cached reference features.

def stats_key(image_hashes: Iterable[str], weights_sha256: str, key_parts: Mapping[str, Any]) -> str:
    """sha256 of (sorted image content hashes, weights hash, key_parts such as the resolution)."""
    payload = {"format": STATS_FORMAT, "dims": FEATURE_DIMS, "images": sorted(image_hashes),
               "weights_sha256": weights_sha256, "parts": dict(key_parts)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def reference_features(files: Sequence[Union[str, os.PathLike]], cache_dir: Union[str, os.PathLike],
                       key_parts: Mapping[str, Any], model: nn.Module, batch_size: int = 50,
                       device: Union[str, torch.device, None] = None, progress: bool = True) -> np.ndarray:
    """Pool3 features (N, 2048) of reference images, cached as ``<cache_dir>/<key>.npz``.

    The features themselves are kept, not only their mean and covariance, because KID needs them. The key
    hashes every image's bytes, the weights hash and `key_parts` (put there whatever else changes the
    features, e.g. ``{"resolution": 256}``): a changed image or other weights give another file.
    """
    weights_sha256 = _require_weights(model)
    files = [Path(p) for p in files]
    key = stats_key((sha256_file(p) for p in files), weights_sha256, {**key_parts, "content": "features"})
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                if str(f["key"]) == key:
                    return f["features"]
        except (OSError, ValueError, KeyError):
            pass  # Unreadable cache file: recompute and replace it.
    feats = extract_features(files, model, batch_size, device, progress)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # A file object: np.savez would append ".npz".
        np.savez(f, features=feats, key=key, weights_sha256=weights_sha256,
                 parts=json.dumps(dict(key_parts), sort_keys=True))
    return feats
