"""Cityscapes photo <-> label pairs from the two user-provided zips (junyanz prepare_cityscapes_dataset.py).

As junyanz's `datasets/prepare_cityscapes_dataset.py` does: ``gtFine/{train,val}/*/*_color.png`` label maps are paired with
``leftImg8bit/{train,val}/*/*_leftImg8bit.png`` photos by name, both resized to 256x256 (bicubic, as the
reference does, so label colours blend at edges), photo = A on the left, label = B on the right; val
becomes test (2975 train / 500 test pairs). Members are read straight from the zips (no extraction),
after the same name checks as `piggyback.data.archive`. Output files are PNG named
``{city}_{seq}_{frame}.png``, the naming the Cityscapes evaluation scripts expect.
"""
from __future__ import annotations

import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Optional

from PIL import Image

from piggyback.data.archive import UnsafeArchiveError, member_path
from piggyback.fsutil import atomic_directory, atomic_write_json

GTFINE_ZIP = "gtFine_trainvaltest.zip"            # 241 MB: fine annotations (we use the *_color.png maps)
LEFTIMG_ZIP = "leftImg8bit_trainvaltest.zip"      # 11 GB: the left camera photos
DOWNLOAD_PAGE = "https://www.cityscapes-dataset.com/downloads/"
DEFAULT_DIR = "data/manual/cityscapes"
PHASES = {"train": "train", "val": "test"}        # Cityscapes phase -> our split
PHOTO_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_color.png"


class CityscapesMissingError(FileNotFoundError):
    """The zips are not where they should be; the message says what to download and where to put it."""


def missing_message(folder: str | Path, missing: list[str]) -> str:
    """Step-by-step instructions for placing the Cityscapes zips by hand."""
    folder = Path(folder)
    return (
        f"Cityscapes needs a login, so it cannot be downloaded automatically. Missing: {', '.join(missing)}.\n"
        f"  1. Register at https://www.cityscapes-dataset.com/register/ and log in.\n"
        f"  2. On {DOWNLOAD_PAGE} download '{GTFINE_ZIP}' (241 MB, gtFine_trainvaltest) and "
        f"'{LEFTIMG_ZIP}' (11 GB, leftImg8bit_trainvaltest).\n"
        f"  3. Put both files, unchanged and not unzipped, in {folder}/ (absolute: {folder.resolve()}/); "
        f"another folder can be named in params.yaml as datasets.<key>.path.\n"
        f"  4. Run the stage again."
    )


def _index(zf: zipfile.ZipFile, zip_path: Path, top: str, suffix: str) -> dict[str, dict[str, zipfile.ZipInfo]]:
    """{split: {key: member}} for ``top/<phase>/<city>/<key><suffix>`` members of train and val."""
    out: dict[str, dict[str, zipfile.ZipInfo]] = {s: {} for s in PHASES.values()}
    for info in zf.infolist():
        rel = member_path(info.filename, zip_path)  # refuses absolute and '..' names
        if rel is None or info.is_dir() or not rel.name.endswith(suffix):
            continue
        parts = rel.parts
        if len(parts) == 4 and parts[0] == top and parts[1] in PHASES:
            if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
                raise UnsafeArchiveError(f"{zip_path}: member {info.filename!r} is not a regular file")
            out[PHASES[parts[1]]][rel.name[: -len(suffix)]] = info
    return out


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int) -> Image.Image:
    with zf.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) > info.file_size:
        raise UnsafeArchiveError(f"{zf.filename}: member {info.filename!r} is larger than its header says")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return img.resize((size, size), Image.BICUBIC)


def build_cityscapes(zip_dir: str | Path, dest: str | Path, size: int = 256, max_bytes: int = 20 * 2**30,
                     overwrite: bool = True, workers: Optional[int] = None) -> dict:
    """Write the paired Cityscapes dataset (``train/ test/``, photo|label) to `dest`; return the counts.

    Raises:
        CityscapesMissingError: a zip is missing (the message explains how to get it).
        UnsafeArchiveError / ValueError: a bad member, too many bytes, or photos and labels that do not pair.
    """
    zip_dir, dest = Path(zip_dir), Path(dest)
    paths = {name: zip_dir / name for name in (GTFINE_ZIP, LEFTIMG_ZIP)}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise CityscapesMissingError(missing_message(zip_dir, missing))
    with zipfile.ZipFile(paths[GTFINE_ZIP]) as zl, zipfile.ZipFile(paths[LEFTIMG_ZIP]) as zp:
        labels = _index(zl, paths[GTFINE_ZIP], "gtFine", LABEL_SUFFIX)
        photos = _index(zp, paths[LEFTIMG_ZIP], "leftImg8bit", PHOTO_SUFFIX)
        jobs, total = [], 0
        for split in PHASES.values():
            unmatched = sorted(set(photos[split]) ^ set(labels[split]))
            if unmatched:
                raise ValueError(f"Cityscapes {split}: {len(unmatched)} photo(s)/label(s) without a partner, e.g. "
                                 f"{', '.join(unmatched[:3])}; are {GTFINE_ZIP} and {LEFTIMG_ZIP} complete?")
            if not photos[split]:
                raise ValueError(f"{paths[LEFTIMG_ZIP]}: no leftImg8bit/{split if split == 'train' else 'val'}"
                                 f"/*/*{PHOTO_SUFFIX} members; is it the right zip?")
            for key in sorted(photos[split]):
                if PurePosixPath(key).name != key or key.startswith("."):
                    raise UnsafeArchiveError(f"unexpected Cityscapes member name {key!r}")
                total += photos[split][key].file_size + labels[split][key].file_size
                jobs.append((split, key))
        if total > max_bytes:
            raise UnsafeArchiveError(f"Cityscapes members add up to {total} bytes, over data.max_download_bytes "
                                     f"({max_bytes})")

        with atomic_directory(dest, overwrite=overwrite) as tmp:
            for split in PHASES.values():
                (tmp / split).mkdir()

            def pair(job: tuple[str, str]) -> None:
                split, key = job
                img = Image.new("RGB", (2 * size, size))
                img.paste(_read(zp, photos[split][key], size), (0, 0))     # A: photo
                img.paste(_read(zl, labels[split][key], size), (size, 0))  # B: colour label map
                img.save(tmp / split / f"{key}.png", format="PNG", compress_level=6)

            # zipfile serialises reads of a shared handle with a lock; decoding runs in parallel.
            with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
                list(pool.map(pair, jobs))
            counts = {s: sum(1 for j in jobs if j[0] == s) for s in PHASES.values()}
            atomic_write_json(tmp / "cityscapes.json", {"size": size, "counts": counts, "A": "photo (leftImg8bit)",
                                                        "B": "colour label map (gtFine_color)"})
    return counts
