"""Loaders: shapes and ranges, A and B on the right side for each direction, the same crop for both halves,
seeded per (epoch, index) randomness, test sets with truth, target images and DDP-ready loaders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from piggyback.config import DataConfig
from piggyback.data.datasets import (AlignedDataset, TestSet, UnalignedDataset, build_loader, make_train_dataset,
                                     target_images)
from piggyback.data.embedded import generate
from piggyback.data.prepare import prepare_dataset

CFG = DataConfig(load_size=36, crop_size=32, flip=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    out = {}
    for kind in ("facades", "thermal"):
        generate(kind, root / "raw" / kind, seed=1, size=32, n_train=6, n_test=4)
        prepare_dataset(root / "raw" / kind, root / kind, dataset=kind)
        out[kind] = root / kind
    # A hand-made paired set: left half red-ish gradient (A), right half the same gradient in blue (B).
    grad = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (16, 1))  # (16, 16), varies along x
    zero = np.zeros_like(grad)
    ab = np.concatenate([np.stack([grad, zero, zero], -1), np.stack([zero, zero, grad], -1)], axis=1)
    for split in ("train", "test"):
        (root / "redblue" / split).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(ab).save(root / "redblue" / split / f"{i}.png")
    out["redblue"] = root / "redblue"
    return out


def _check_item(item: dict, size: int) -> None:
    for key in ("A", "B"):
        x = item[key]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    assert isinstance(item["A_paths"], str) and isinstance(item["B_paths"], str)


def test_unaligned_shapes_and_seeded_randomness(prepared):
    ds = UnalignedDataset(prepared["thermal"], "train", CFG.load_size, CFG.crop_size, CFG.flip, seed=7)
    assert len(ds) == 6
    _check_item(ds[0], 32)
    again = UnalignedDataset(prepared["thermal"], "train", CFG.load_size, CFG.crop_size, CFG.flip, seed=7)
    backwards = {i: again[i] for i in reversed(range(len(ds)))}
    for i in range(len(ds)):  # the same (seed, epoch, index) gives the same sample, in any order
        assert torch.equal(ds[i]["A"], backwards[i]["A"]) and torch.equal(ds[i]["B"], backwards[i]["B"])
    partners = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        partners.append(tuple(ds[i]["B_paths"] for i in range(len(ds))))
    assert len(set(partners)) > 1  # a new random B for each A every epoch
    assert "testA" in UnalignedDataset(prepared["thermal"], "test", 36, 32, seed=7)[0]["A_paths"]


def test_unaligned_direction_swaps_domains(prepared):
    ab = UnalignedDataset(prepared["thermal"], "test", 36, 32)
    ba = UnalignedDataset(prepared["thermal"], "test", 36, 32, direction="BtoA")
    assert "/testA/" in ab[0]["A_paths"] and "/testB/" in ba[0]["A_paths"] and "/testA/" in ba[0]["B_paths"]


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_aligned_halves_land_on_the_right_side(prepared, direction):
    ds = AlignedDataset(prepared["redblue"], "train", direction, load_size=20, crop_size=16, flip=True, seed=0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            _check_item(item, 16)
            red, blue = (item["A"], item["B"]) if direction == "AtoB" else (item["B"], item["A"])
            assert red[0].mean() > red[2].mean() and blue[2].mean() > blue[0].mean()
            assert torch.allclose(red[0], blue[2])  # the same crop and flip for both halves


def test_make_train_dataset_modes(prepared):
    pix = make_train_dataset(prepared["facades"], "pix2pix", "BtoA", CFG, seed=0)
    assert isinstance(pix, AlignedDataset) and pix.direction == "BtoA"
    cyc = make_train_dataset(prepared["facades"], "cyclegan", "AtoB", CFG, seed=0)
    assert isinstance(cyc, UnalignedDataset) and len(cyc) == 6
    _check_item(cyc[0], 32)
    with pytest.raises(ValueError, match=str(prepared["thermal"])):
        make_train_dataset(prepared["thermal"], "pix2pix", "AtoB", CFG, seed=0)


def test_testset_truth_for_paired_and_unpaired(prepared):
    paired = TestSet(prepared["facades"], "AtoB", size=32)
    assert len(paired) == 4 and paired.has_truth and paired[0]["name"] == "0000"
    back = TestSet(prepared["facades"], "AtoB", size=32, reverse=True)
    assert torch.equal(paired[1]["A"], back[1]["B"]) and torch.equal(paired[1]["B"], back[1]["A"])
    unpaired = TestSet(prepared["thermal"], "AtoB", size=24, limit=3)
    item = unpaired[0]
    assert len(unpaired) == 3 and unpaired.has_truth and item["A"].shape == item["B"].shape == (3, 24, 24)
    truth = np.asarray(Image.open(prepared["thermal"] / "testA_truth/0000.png").resize((24, 24), Image.BICUBIC))
    assert torch.allclose(item["B"], torch.from_numpy(truth.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    assert TestSet(prepared["thermal"], "BtoA", size=24).has_truth
    loader, _ = build_loader(unpaired, batch_size=2, shuffle=False)
    batch = next(iter(loader))
    assert batch["A"].shape == batch["B"].shape == (2, 3, 24, 24) and batch["name"] == ["0000", "0001"]


def test_target_images(prepared):
    imgs = list(target_images(prepared["thermal"], "AtoB", size=16))
    assert len(imgs) == 4 and imgs[0].shape == (16, 16, 3) and imgs[0].dtype == np.uint8
    red = next(target_images(prepared["redblue"], "BtoA", size=8))  # BtoA: the targets are the A halves
    assert red[..., 0].mean() > 50 and red[..., 2].max() == 0


def test_loader_is_deterministic_and_ddp_equivalent(prepared):
    ds = UnalignedDataset(prepared["thermal"], "train", 36, 32, seed=3)
    batches = {}
    for workers in (0, 2):
        loader, sampler = build_loader(ds, batch_size=2, num_workers=workers, shuffle=True, seed=3)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        batches[workers] = [b["A"] for b in loader]
    assert len(batches[0]) == 3 and all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))
    # One process with batch 2 sees exactly what two DDP ranks with batch 1 see together.
    one = list(DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3))
    two = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=3)) for r in (0, 1)]
    assert [sorted(one[2 * k:2 * k + 2]) for k in range(3)] == [sorted([two[0][k], two[1][k]]) for k in range(3)]
