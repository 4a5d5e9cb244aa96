"""Loaders over prepared datasets: unaligned (CycleGAN) and aligned (pix2pix), test sets, target images.

Transforms follow junyanz `data/base_dataset.py`: train = resize to (load_size, load_size)
bicubic, random crop to crop_size, random horizontal flip; test = resize to (crop_size, crop_size) only;
then scaled to [-1, 1]. Unlike the reference, every random choice (the B partner of an unaligned sample,
crop offsets, flips) comes from a generator seeded by (seed, epoch, index) rather than the global RNG, so a
sample depends only on its global index: a resumed run, a 1-process run and a 2-process DDP run see the
same images. Call `set_epoch` on the dataset (and on the sampler) before each epoch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from piggyback.data.prepare import list_images

BICUBIC = Image.BICUBIC


@dataclass(frozen=True)
class ImageRef:
    """An image file, or one half of an A|B file (half 0 = left = A, 1 = right = B)."""
    path: Path
    half: Optional[int] = None

    def load(self) -> Image.Image:
        img = Image.open(self.path).convert("RGB")
        if self.half is None:
            return img
        w2 = img.width // 2  # junyanz AlignedDataset: A = [0, w/2), B = [w/2, w)
        return img.crop((0, 0, w2, img.height) if self.half == 0 else (w2, 0, img.width, img.height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    arr = np.array(img, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator behind every random choice of sample `index` in `epoch`."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


@dataclass(frozen=True)
class CropFlip:
    x: int
    y: int
    flip: bool


def draw_crop_flip(rng: np.random.Generator, load_size: int, crop_size: int, flip: bool) -> CropFlip:
    """Crop offsets in [0, load - crop] (inclusive, as junyanz get_params) and a fair-coin flip."""
    hi = max(0, load_size - crop_size)
    x, y = int(rng.integers(0, hi + 1)), int(rng.integers(0, hi + 1))
    return CropFlip(x, y, bool(flip and rng.random() > 0.5))


def train_transform(img: Image.Image, p: CropFlip, load_size: int, crop_size: int) -> torch.Tensor:
    img = img.resize((load_size, load_size), BICUBIC).crop((p.x, p.y, p.x + crop_size, p.y + crop_size))
    if p.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def test_transform(img: Image.Image, size: int) -> torch.Tensor:
    return to_tensor(img.resize((size, size), BICUBIC))


def _refs(folder: Path, half: Optional[int] = None) -> list[ImageRef]:
    files = list_images(folder) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no images (is the dataset prepared? run the prepare stage)")
    return [ImageRef(p, half) for p in files]


def _check_sizes(load_size: int, crop_size: int) -> None:
    if not 0 < crop_size <= load_size:
        raise ValueError(f"need 0 < crop_size <= load_size, got crop_size={crop_size}, load_size={load_size}")


class _EpochDataset(Dataset):
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random partners, crops and flips `__getitem__` returns."""
        self.epoch = int(epoch)


class UnalignedDataset(_EpochDataset):
    """Unpaired A and B (junyanz UnalignedDataset): A in order, B drawn at random for each sample.

    Items: {"A", "B": float tensors (3, crop, crop) in [-1, 1], "A_paths", "B_paths": str}. With
    ``paired_halves=True`` the domains are the left and right halves of a paired ``phase/`` folder.
    ``direction="BtoA"`` swaps the domains. Length = max(|A|, |B|). At test phase B is ``index % |B|``
    and images are only resized to crop_size.
    """

    def __init__(self, root: str | Path, phase: str = "train", load_size: int = 286, crop_size: int = 256,
                 flip: bool = True, seed: int = 0, direction: str = "AtoB", paired_halves: bool = False):
        _check_sizes(load_size, crop_size)
        root = Path(root)
        if paired_halves:
            self.A, self.B = _refs(root / phase, 0), _refs(root / phase, 1)
        else:
            self.A, self.B = _refs(root / f"{phase}A"), _refs(root / f"{phase}B")
        if direction == "BtoA":
            self.A, self.B = self.B, self.A
        self.phase, self.load_size, self.crop_size, self.flip, self.seed = phase, load_size, crop_size, flip, seed

    def __len__(self) -> int:
        return max(len(self.A), len(self.B))

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, self.epoch, index)
        a = self.A[index % len(self.A)]
        b = self.B[int(rng.integers(len(self.B)))] if self.phase == "train" else self.B[index % len(self.B)]
        if self.phase == "train":  # independent crops and flips for A and B, as in the reference
            A = train_transform(a.load(), draw_crop_flip(rng, self.load_size, self.crop_size, self.flip),
                                self.load_size, self.crop_size)
            B = train_transform(b.load(), draw_crop_flip(rng, self.load_size, self.crop_size, self.flip),
                                self.load_size, self.crop_size)
        else:
            A, B = test_transform(a.load(), self.crop_size), test_transform(b.load(), self.crop_size)
        return {"A": A, "B": B, "A_paths": str(a.path), "B_paths": str(b.path)}


class AlignedDataset(_EpochDataset):
    """Paired A|B images (junyanz AlignedDataset): the same crop and flip for both halves.

    ``direction="AtoB"``: A = left half, B = right half; ``"BtoA"`` swaps them. Items as UnalignedDataset.
    """

    def __init__(self, root: str | Path, phase: str = "train", direction: str = "AtoB", load_size: int = 286,
                 crop_size: int = 256, flip: bool = True, seed: int = 0):
        _check_sizes(load_size, crop_size)
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"direction must be AtoB or BtoA, got {direction!r}")
        self.files = [r.path for r in _refs(Path(root) / phase)]
        self.phase, self.direction = phase, direction
        self.load_size, self.crop_size, self.flip, self.seed = load_size, crop_size, flip, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        left, right = ImageRef(path, 0).load(), ImageRef(path, 1).load()
        A, B = (left, right) if self.direction == "AtoB" else (right, left)
        if self.phase == "train":
            p = draw_crop_flip(sample_rng(self.seed, self.epoch, index), self.load_size, self.crop_size, self.flip)
            A, B = (train_transform(x, p, self.load_size, self.crop_size) for x in (A, B))
        else:
            A, B = test_transform(A, self.crop_size), test_transform(B, self.crop_size)
        return {"A": A, "B": B, "A_paths": str(path), "B_paths": str(path)}


def dataset_layout(prepared_root: str | Path) -> str:
    """"unpaired" or "paired", from manifest.json or, without one, from the folders."""
    root = Path(prepared_root)
    manifest = root / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["layout"]
    if (root / "trainA").is_dir() or (root / "testA").is_dir():
        return "unpaired"
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "paired"
    raise FileNotFoundError(f"{root}: not a prepared dataset (no manifest.json, trainA/ or train/)")


def make_train_dataset(prepared_root: str | Path, mode: str, direction: str, data_cfg, seed: int) -> _EpochDataset:
    """The training dataset of a task: pix2pix -> AlignedDataset; cyclegan -> UnalignedDataset.

    `data_cfg` is a `piggyback.config.DataConfig` (load_size, crop_size, flip). CycleGAN on a paired
    dataset draws its B at random from the right halves, so the pairing is not used.
    """
    root = Path(prepared_root)
    layout = dataset_layout(root)
    sizes = dict(load_size=data_cfg.load_size, crop_size=data_cfg.crop_size, flip=data_cfg.flip, seed=seed)
    if mode == "pix2pix":
        if layout != "paired":
            raise ValueError(f"{root}: pix2pix needs a paired dataset (train/ and test/ with A|B side by side), "
                             f"but this one is {layout} (trainA/ trainB/ testA/ testB/); use mode: cyclegan")
        return AlignedDataset(root, "train", direction, **sizes)
    if mode == "cyclegan":
        return UnalignedDataset(root, "train", direction=direction, paired_halves=layout == "paired", **sizes)
    raise ValueError(f"unknown mode {mode!r} (cyclegan or pix2pix)")


def _domains(direction: str, reverse: bool) -> tuple[str, str]:
    if direction not in ("AtoB", "BtoA"):
        raise ValueError(f"direction must be AtoB or BtoA, got {direction!r}")
    src, tgt = ("A", "B") if direction == "AtoB" else ("B", "A")
    return (tgt, src) if reverse else (src, tgt)


class TestSet(Dataset):
    """Deterministic test items {"A": input (3, size, size), "B": true output or None, "name": file stem}.

    "A"/"B" are the input and target of the translation evaluated: for direction BtoA the input is the
    B-domain image; ``reverse=True`` evaluates the other way (CycleGAN's G_B). Paired: the other half is
    the truth. Unpaired: ``test<src>_truth/<stem>.*`` when present, else None. `limit` keeps the first n.
    """
    __test__ = False  # not a pytest class

    def __init__(self, prepared_root: str | Path, direction: str = "AtoB", size: int = 256, reverse: bool = False,
                 limit: int = 0):
        root = Path(prepared_root)
        src, tgt = _domains(direction, reverse)
        self.size = size
        if dataset_layout(root) == "paired":
            half = {"A": 0, "B": 1}
            self.items = [(ImageRef(r.path, half[src]), ImageRef(r.path, half[tgt]), r.path.stem)
                          for r in _refs(root / "test")]
        else:
            truth_dir = root / f"test{src}_truth"
            truth = {p.stem: p for p in list_images(truth_dir)} if truth_dir.is_dir() else {}
            self.items = [(r, ImageRef(truth[r.path.stem]) if r.path.stem in truth else None, r.path.stem)
                          for r in _refs(root / f"test{src}")]
        if limit:
            self.items = self.items[:limit]

    @property
    def has_truth(self) -> bool:
        """True when every item has a true output."""
        return all(t is not None for _, t, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        src, truth, name = self.items[index]
        return {"A": test_transform(src.load(), self.size),
                "B": None if truth is None else test_transform(truth.load(), self.size), "name": name}


def collate_test(batch: list[dict]) -> dict:
    """Batch TestSet items: "B" is a stacked tensor when every item has truth, else None."""
    B = [b["B"] for b in batch]
    return {"A": torch.stack([b["A"] for b in batch]), "name": [b["name"] for b in batch],
            "B": torch.stack(B) if all(x is not None for x in B) else None}


def target_images(prepared_root: str | Path, direction: str = "AtoB", size: int = 256, reverse: bool = False,
                  limit: int = 0) -> Iterator[np.ndarray]:
    """Real target-domain test images as uint8 (size, size, 3) arrays, sorted by name (for FID/KID).

    Unpaired: test<tgt>/ (testB for AtoB). Paired: the target halves of test/.
    """
    root = Path(prepared_root)
    src, tgt = _domains(direction, reverse)
    if dataset_layout(root) == "paired":
        refs = [ImageRef(r.path, {"A": 0, "B": 1}[tgt]) for r in _refs(root / "test")]
    else:
        refs = _refs(root / f"test{tgt}")
    for ref in refs[:limit] if limit else refs:
        yield np.array(ref.load().resize((size, size), BICUBIC), dtype=np.uint8)


def train_targets(prepared_root: str | Path, direction: str = "AtoB", size: int = 256,
                  reverse: bool = False) -> Iterator[torch.Tensor]:
    """The training split's target-domain images as (3, size, size) tensors in [-1, 1], resized as test
    images are (the do-nothing reference averages them). Paired: right halves of train/; unpaired: train<tgt>/."""
    root = Path(prepared_root)
    tgt = _domains(direction, reverse)[1]
    if dataset_layout(root) == "paired":
        refs = [ImageRef(r.path, {"A": 0, "B": 1}[tgt]) for r in _refs(root / "train")]
    else:
        refs = _refs(root / f"train{tgt}")
    for ref in refs:
        yield test_transform(ref.load(), size)


def build_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                 distributed: Optional[bool] = None) -> tuple[DataLoader, DistributedSampler]:
    """A DataLoader and its sampler; call ``sampler.set_epoch(e)`` and ``dataset.set_epoch(e)`` each epoch.

    The sampler is always a `DistributedSampler` (num_replicas=1 outside DDP), so one process walks the
    same seeded permutation that N processes share out: global batch k holds the same samples either way.
    `distributed` defaults to whether torch.distributed is initialised. The loader's own generator is
    seeded too, so creating an iterator does not consume the global torch RNG (bit-exact resume).
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
    else:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=False, persistent_workers=False,
                        generator=torch.Generator().manual_seed(seed),
                        collate_fn=collate_test if isinstance(dataset, TestSet) else None)
    return loader, sampler
