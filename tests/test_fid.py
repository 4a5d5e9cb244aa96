"""piggyback.fid against pytorch-fid 0.3.0: same network, same features, same Fréchet distance.

A randomly initialised FID Inception written to a real file stands in for the official weights (which
cannot be downloaded here); its numbers are plumbing checks, not FID.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import piggyback.fid as fid
from fid_helpers import hub_file, pytorch_fid_cli, smooth_images, write_png_folder, write_random_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weight FID Inception at TORCH_HOME/hub/checkpoints/<official name>: (file, TORCH_HOME)."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    return write_random_inception(hub_file(torch_home), seed=0), torch_home


@pytest.fixture(scope="module")
def model(weights):
    return fid.load_fid_inception(weights[0], "cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_png_folder(root / "a", 8, 64, seed=1)
    write_png_folder(root / "b", 8, 64, seed=2, brightness=0.7)
    shutil.copytree(root / "a", root / "a_copy")
    return root


# ----------------------------------------------------------------------------------------------
# Fréchet distance and statistics (no network).

def _random_stats(rng, n, d, scale):
    x = rng.standard_normal((n, d)) @ (np.eye(d) + scale * rng.standard_normal((d, d)) / np.sqrt(d))
    x = np.abs(x + scale)  # Nonnegative and skewed, like pool3 features.
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_matches_pytorch_fid_full_rank():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    mu1, s1 = _random_stats(rng, 2500, 2048, 0.5)   # n > d: full-rank covariances
    mu2, s2 = _random_stats(rng, 2500, 2048, 1.0)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_matches_pytorch_fid_rank_deficient():
    # 120 vs 140 samples (horse2zebra's test sets), rank 119 / 139 covariances. sqrtm of the singular
    # product is less accurate than the eigh route, so the tolerance is looser (1e-5 relative; they agree
    # to ~1e-8 in practice). 512-d keeps sqrtm fast; the CLI test covers rank deficiency at 2048-d.
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    mu1, s1 = _random_stats(rng, 120, 512, 0.5)
    mu2, s2 = _random_stats(rng, 140, 512, 1.0)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-5)


def test_frechet_analytic_gaussians():
    rng = np.random.default_rng(2)
    d = 64
    a = rng.standard_normal((d, d))
    sigma = a @ a.T / d
    mu = rng.standard_normal(d)
    shift = rng.standard_normal(d)
    # Equal covariances: only the mean shift remains.
    assert fid.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-9)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))² + |shift|².
    va, vb = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    expected = shift @ shift + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert fid.frechet_distance(mu, np.diag(va), mu + shift, np.diag(vb)) == pytest.approx(expected, rel=1e-9)


def test_shifted_gaussian_samples():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 16))
    shift = np.full(16, 0.5)
    # Same samples, shifted: identical covariances, the distance is exactly |shift|².
    assert fid.fid_from_features(x, x + shift) == pytest.approx(16 * 0.25, rel=1e-9)
    assert abs(fid.fid_from_features(x, x)) < 1e-9


def test_feature_stats_matches_numpy():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((301, 32)) * 0.1 + 1e3  # Large mean: the shifted sums must not cancel.
    stats = fid.FeatureStats(dims=32)
    for chunk in np.array_split(x, 7):
        stats.append(chunk)
    stats.append(torch.empty(0, 32))
    assert stats.count == 301
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError):
        fid.FeatureStats(dims=3).cov()


def test_frechet_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------
# Network and features.

def test_model_equals_pytorch_fid_network(weights, model, monkeypatch):
    from pytorch_fid.inception import InceptionV3

    monkeypatch.setenv("TORCH_HOME", str(weights[1]))  # pytorch-fid finds the file in the hub cache.
    ref = InceptionV3([3]).eval()
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = smooth_images(2, 64, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref(x)[0])
    assert model.weights_sha256 == fid.sha256_file(weights[0])
    assert not any(p.requires_grad for p in model.parameters())


def test_fid_equals_pytorch_fid_cli(weights, model, folders):
    f1 = fid.extract_features(folders / "a", model, batch_size=4, progress=False)
    f2 = fid.extract_features(folders / "b", model, batch_size=4, progress=False)
    ours = fid.fid_from_features(f1, f2)
    theirs = pytorch_fid_cli(folders / "a", folders / "b", weights[1], batch_size=4)
    assert ours > 1.0  # A meaningful scale for the 1e-3 comparison.
    assert abs(ours - theirs) <= 1e-3
    # 8 samples in 2048-d: rank-7 covariances, where the trace term has a closed form, tr sqrt(S1 S2) =
    # the nuclear norm of X1c X2cᵀ / (n - 1) (centred features). Ours matches it far closer than the
    # 1e-3 above, which is pytorch-fid's sqrtm error on singular products (features are bit-identical).
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    diff = f1.mean(0) - f2.mean(0)
    exact = (diff @ diff + (x1 * x1).sum() / 7 + (x2 * x2).sum() / 7
             - 2 * np.linalg.svd(x1 @ x2.T / 7, compute_uv=False).sum())
    assert ours == pytest.approx(exact, rel=1e-6)


def test_identical_folders_give_zero(model, folders):
    a, a_copy = (fid.extract_features(folders / k, model, batch_size=4, progress=False) for k in ("a", "a_copy"))
    assert abs(fid.fid_from_features(a, a_copy)) < 1e-3


def test_feature_inputs_agree(model, folders):
    files = fid.image_files(folders / "a")[:3]
    from_files = fid.extract_features(files, model, batch_size=3, progress=False)
    arrays = [np.asarray(Image.open(p)) for p in files]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_array_equal(fid.extract_features(tensor, model, batch_size=3, progress=False), from_files)
    pil = [Image.open(p) for p in files]
    np.testing.assert_array_equal(fid.extract_features(pil, model, batch_size=3, progress=False), from_files)
    assert from_files.dtype == np.float64 and from_files.shape == (3, 2048)
    # Mixed sizes: one batch per run of equal sizes, same features as one image at a time (up to float32
    # summation order when the batch size differs).
    mixed = [arrays[0], arrays[1][:48, :40], arrays[2], arrays[0]]
    together = fid.extract_features(mixed, model, batch_size=8, progress=False)
    alone = np.concatenate([fid.extract_features([a], model, batch_size=1, progress=False) for a in mixed])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid.extract_features(tensor * 2 - 1, model, progress=False)


def test_fid_needs_a_weights_file(folders):
    class Bare(torch.nn.Module):
        def forward(self, x):
            return [x.mean((2, 3), keepdim=True)]

    with pytest.raises(ValueError, match="weights"):
        fid.reference_features(fid.image_files(folders / "a"), folders / "cache", {}, Bare())
    with pytest.raises(FileNotFoundError):
        fid.load_fid_inception(folders / "missing.pth")


# ----------------------------------------------------------------------------------------------
# Weights resolution.

def test_missing_params_path_is_an_error(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        fid.resolve_inception_weights(str(missing))


def test_params_path_wins(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert fid.resolve_inception_weights(str(weights[0])) == (weights[0], None)


def test_no_weights_and_no_download_gives_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    path, reason = fid.resolve_inception_weights(None)
    assert path is None
    assert str(fid.hub_weights_path()) in reason and "network unreachable" in reason
    assert "github.com/mseitzer/pytorch-fid" in reason
    path, reason = fid.resolve_inception_weights(None, allow_download=False)
    assert path is None and "downloads disabled" in reason


def test_hub_cache_and_download(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    sha = fid.sha256_file(weights[0])
    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        downloads.append(url)
        assert sha.startswith(hash_prefix)
        shutil.copyfile(weights[0], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    # The random file is not the official one: the cached copy is refused by its hash prefix...
    hub_file(tmp_path).parent.mkdir(parents=True)
    shutil.copyfile(weights[0], hub_file(tmp_path))
    path, reason = fid.resolve_inception_weights(None)
    assert path is None and sha in reason and not downloads
    # ...and accepted when it carries it (pretend it does); a download records the full hash.
    hub_file(tmp_path).unlink()
    monkeypatch.setattr(fid, "FID_WEIGHTS_SHA256_PREFIX", sha[:8])
    assert fid.resolve_inception_weights(None) == (hub_file(tmp_path), None)
    assert len(downloads) == 1
    record = hub_file(tmp_path).with_name(fid.FID_WEIGHTS_NAME + ".sha256")
    assert record.read_text().split()[0] == sha
    assert fid.resolve_inception_weights(None) == (hub_file(tmp_path), None)  # from the cache
    assert len(downloads) == 1
    record.write_text("0" * 64 + "\n")  # A file changed since its download is refused.
    path, reason = fid.resolve_inception_weights(None)
    assert path is None and "recorded" in reason


# ----------------------------------------------------------------------------------------------
# Cached reference statistics.

def test_reference_features_cache(model, tmp_path, monkeypatch):
    files = write_png_folder(tmp_path / "ref", 4, 32, seed=7)
    cache = tmp_path / "cache"
    calls = []
    extract = fid.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return extract(*args, **kwargs)

    monkeypatch.setattr(fid, "extract_features", counting)
    parts = {"resolution": 32}
    feats = fid.reference_features(files, cache, parts, model, batch_size=4, progress=False)
    assert len(calls) == 1 and len(list(cache.glob("*.npz"))) == 1
    np.testing.assert_array_equal(feats, extract(files, model, batch_size=4, progress=False))
    assert feats.shape == (4, 2048) and feats.dtype == np.float64
    # Hit: no feature extraction, same numbers.
    np.testing.assert_array_equal(fid.reference_features(files, cache, parts, model, batch_size=4, progress=False), feats)
    assert len(calls) == 1
    # A changed image, other key parts or other weights: a miss and a new file.
    arr = np.asarray(Image.open(files[0])).copy()
    arr[0, 0] ^= 1
    Image.fromarray(arr).save(files[0])
    fid.reference_features(files, cache, parts, model, batch_size=4, progress=False)
    assert len(calls) == 2
    fid.reference_features(files, cache, {"resolution": 64}, model, batch_size=4, progress=False)
    assert len(calls) == 3
    monkeypatch.setattr(model, "weights_sha256", "f" * 64)
    fid.reference_features(files, cache, parts, model, batch_size=4, progress=False)
    assert len(calls) == 4 and len(list(cache.glob("*.npz"))) == 4
    assert not list(cache.glob("*.tmp"))
