"""Prepare a raw dataset for training: check every image, convert to RGB, fix the splits, write a manifest.

Input layouts (junyanz's): unpaired ``trainA/ trainB/ testA/ testB/`` (CycleGAN archives, user
folders, the embedded suite, which adds ``testA_truth/ testB_truth/``); paired ``train/ test/`` or
``train/ val/`` with A|B side by side (pix2pix archives: val is the test split when test/ is missing); or
``A/ B/`` with matching file names (flat, or with train/ test/ sub-folders), combined here into A|B.
Output: unpaired ``trainA/ trainB/ testA/ testB/ [testA_truth/ testB_truth/]`` or paired ``train/ test/``,
plus ``manifest.json``. A file keeps its stem; its bytes are copied when it is already an RGB JPEG or PNG
and no resize is asked for, otherwise it is written as PNG (lossless). Every check opens the image twice,
``verify()`` then ``load()``, so truncated files are caught (LOAD_TRUNCATED_IMAGES is never set).
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageFile

from piggyback.fsutil import atomic_directory, atomic_write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")  # any case
UNPAIRED_SPLITS = ("trainA", "trainB", "testA", "testB")
TRUTH_SPLITS = {"testA_truth": "testA", "testB_truth": "testB"}  # truth folder -> the split it follows
PAIRED_SPLITS = ("train", "test")
TEST_FRACTION = 0.1  # Flat A/ B/ folders: this share (at least one pair) becomes the fixed test split.
LAYOUT_HELP = ("unpaired trainA/ trainB/ testA/ testB/; paired train/ and test/ (or val/) with A|B side by "
               "side, A on the left; or A/ and B/ holding images with matching file names")


class LayoutError(ValueError):
    """The folder is not in a known dataset layout; the message names it and lists the layouts."""


class BadImagesError(ValueError):
    """Bad images under data.bad_images=stop, or a split left empty; the message lists every file."""


class BadImage(Exception):
    """One unusable file; `reason` says why."""


def is_image(path: Path) -> bool:
    """An image file name by extension (upper case counts); hidden files (``._x.jpg``) are not."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively (as junyanz make_dataset), sorted by relative path."""
    folder = Path(folder)
    return sorted((p for p in folder.rglob("*") if p.is_file() and is_image(p)),
                  key=lambda p: p.relative_to(folder).as_posix())


def detect_layout(root: str | Path) -> str:
    """"unpaired", "paired" (A|B side by side) or "folders" (A/ and B/); LayoutError otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder (expected a dataset in one of these layouts: {LAYOUT_HELP})")
    names = {p.name for p in root.iterdir() if p.is_dir()}
    if names & set(UNPAIRED_SPLITS):
        missing = [s for s in UNPAIRED_SPLITS if s not in names]
        if missing:
            raise LayoutError(f"{root}: unpaired layout without {', '.join(m + '/' for m in missing)} "
                              f"(needs {', '.join(s + '/' for s in UNPAIRED_SPLITS)})")
        return "unpaired"
    if "train" in names:
        if not names & {"test", "val"}:
            raise LayoutError(f"{root}: paired layout has train/ but neither test/ nor val/")
        return "paired"
    if {"A", "B"} <= names:
        return "folders"
    raise LayoutError(f"{root}: not a dataset folder; expected {LAYOUT_HELP}. "
                      f"Found sub-folders: {', '.join(sorted(names)) or 'none'}")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; 16-bit and float grey levels are scaled to 8 bits, alpha is dropped."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit range to 8-bit
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage(f"image mode {im.mode} cannot be converted to RGB ({e})") from e


def load_checked(path: Path) -> tuple[Image.Image, bool]:
    """Open, verify and fully decode `path`; return (RGB image, whether its bytes can be kept as they are).

    Raises:
        BadImage: empty, not an image, truncated or corrupt, too large, or an unconvertible mode.
    """
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    # PIL plugins raise many exception types on bad input (OSError, SyntaxError, struct.error, ...).
    try:
        with Image.open(path) as im:
            im.verify()
    except Image.DecompressionBombError as e:
        raise BadImage(f"too many pixels: {e}") from e
    except Exception as e:  # noqa: BLE001
        kind = "not an image" if isinstance(e, Image.UnidentifiedImageError) else "corrupt image"
        raise BadImage(f"{kind}: {e}") from e
    try:
        with Image.open(path) as im:
            im.load()
            keep = im.mode == "RGB" and im.format in ("JPEG", "PNG") and _matches_format(path, im.format)
            rgb = to_rgb(im)
            rgb = rgb.copy() if rgb is im else rgb
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadImage(f"truncated or corrupt image: {e}") from e
    if rgb.width < 1 or rgb.height < 1:
        raise BadImage(f"degenerate size {rgb.size}")
    return rgb, keep


def _matches_format(path: Path, fmt: str) -> bool:
    return (path.suffix.lower() in (".jpg", ".jpeg")) == (fmt == "JPEG")


@dataclass
class _Job:
    split: str
    stem: str                      # output file stem
    sources: tuple[Path, ...]      # one file, or (A, B) to combine
    paired: bool                   # one source holding A|B: resize each half


def _encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _run(job: _Job, out: Path, resize: Optional[int]) -> dict:
    """Check, convert and write one output file; return its manifest record or its bad files."""
    imgs, keeps, bad = [], [], []
    for src in job.sources:
        try:
            img, keep = load_checked(src)
            imgs.append(img)
            keeps.append(keep)
        except BadImage as e:
            bad.append({"path": str(src), "reason": str(e)})
    if bad:
        return {"bad": bad}
    if len(imgs) == 2:  # A/ and B/ folders: B takes A's size unless a resize is asked for
        a, b = imgs
        side = (resize, resize) if resize else a.size
        a, b = a.resize(side, Image.BICUBIC), b.resize((side[0], side[1]), Image.BICUBIC)
        img = Image.new("RGB", (2 * side[0], side[1]))
        img.paste(a, (0, 0))
        img.paste(b, (side[0], 0))
        data, ext = _encode(img), ".png"
    else:
        img, src = imgs[0], job.sources[0]
        if job.paired and img.width < 2:
            return {"bad": [{"path": str(src), "reason": f"too narrow ({img.width} px) to hold A|B"}]}
        if resize and job.paired:
            w2 = img.width // 2  # junyanz AlignedDataset: A = [0, w/2), B = [w/2, w)
            halves = [img.crop((0, 0, w2, img.height)), img.crop((w2, 0, img.width, img.height))]
            img = Image.new("RGB", (2 * resize, resize))
            for i, half in enumerate(halves):
                img.paste(half.resize((resize, resize), Image.BICUBIC), (i * resize, 0))
        elif resize:
            img = img.resize((resize, resize), Image.BICUBIC)
        if keeps[0] and not resize:
            data, ext = src.read_bytes(), (".jpg" if src.suffix.lower() in (".jpg", ".jpeg") else ".png")
        else:
            data, ext = _encode(img), ".png"
    rel = f"{job.split}/{job.stem}{ext}"
    (out / rel).write_bytes(data)
    return {"rel": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "size": list(img.size)}


def _stems(folder: Path, files: list[Path], bad: list[dict]) -> dict[str, Path]:
    """Output stem for each file (sub-folders joined with "__"); a second file with the same stem is bad."""
    out: dict[str, Path] = {}
    for p in files:
        stem = p.relative_to(folder).with_suffix("").as_posix().replace("/", "__")
        if stem in out:
            bad.append({"path": str(p), "reason": f"duplicate name: {out[stem].name} has the same stem"})
        else:
            out[stem] = p
    return out


def _unmatched_reason(path: Path, other: str) -> str:
    """Why a file without a partner is left out; a corrupt one is reported as corrupt first."""
    try:
        load_checked(path)
    except BadImage as e:
        return f"{e} (and no file with the same name in {other}/)"
    return f"no file with the same name in {other}/"


def _plan(raw: Path, layout: str, bad: list[dict]) -> list[_Job]:
    """The jobs that build the prepared folder from `raw`; unmatched or duplicate files go to `bad`."""
    jobs: list[_Job] = []
    if layout == "unpaired":
        for split in UNPAIRED_SPLITS + tuple(TRUTH_SPLITS):
            if (raw / split).is_dir():
                for stem, p in _stems(raw / split, list_images(raw / split), bad).items():
                    jobs.append(_Job(split, stem, (p,), False))
    elif layout == "paired":
        test = "test" if (raw / "test").is_dir() and list_images(raw / "test") else "val"
        for split, folder in [("train", "train"), ("test", test)]:
            for stem, p in _stems(raw / folder, list_images(raw / folder), bad).items():
                jobs.append(_Job(split, stem, (p,), True))
    else:  # A/ B/ folders, with or without train/ test/ (val/) sub-folders
        subs = [s for s in ("train", "test", "val") if (raw / "A" / s).is_dir()]
        groups = [(s, raw / "A" / s, raw / "B" / s) for s in subs] if subs else [("", raw / "A", raw / "B")]
        for split, fa, fb in groups:
            a, b = _stems(fa, list_images(fa), bad), _stems(fb, list_images(fb), bad)
            for stem in sorted(set(a) ^ set(b)):
                side, other = (a, "B") if stem in a else (b, "A")
                bad.append({"path": str(side[stem]), "reason": _unmatched_reason(side[stem], other)})
            common = sorted(set(a) & set(b))
            if not split:  # flat folders: a fixed test split chosen by a hash of the name
                n_test = max(1, round(TEST_FRACTION * len(common))) if len(common) > 1 else 0
                by_hash = sorted(common, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
                test = set(by_hash[:n_test])
            split_of = {s: (split if split else ("test" if s in test else "train")) for s in common}
            for stem in common:
                dest = "test" if split_of[stem] == "val" and "test" not in subs else split_of[stem]
                if dest in PAIRED_SPLITS:
                    jobs.append(_Job(dest, stem, (a[stem], b[stem]), False))
    return jobs


def prepare_dataset(raw_root: str | Path, out_root: str | Path, dataset: str = "", bad_images: str = "skip",
                    resize: Optional[int] = None, workers: Optional[int] = None,
                    origin: Optional[str | Path] = None) -> dict:
    """Check and convert `raw_root` into `out_root` (atomically, replacing it) and return the manifest.

    Args:
        raw_root: a dataset folder in any layout of `detect_layout`.
        out_root: the prepared folder to (re)create.
        dataset: the dataset key, stored in the manifest.
        bad_images: "skip" (report bad files, leave them out) or "stop" (fail, listing every bad file).
        resize: square side for every image (each half of A|B); None keeps the sizes.
        workers: threads for decoding (PIL releases the GIL); default all cores.
        origin: the folder `raw_root` was copied from (a user's own dataset): bad files are named there.

    Raises:
        LayoutError: unknown layout. BadImagesError: bad files under "stop", or a split left empty.
    """
    if bad_images not in ("skip", "stop"):
        raise ValueError(f"bad_images must be 'skip' or 'stop', got {bad_images!r}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by some other library: it would hide truncated files
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; prepare needs it False "
                           "to detect truncated images")
    raw, out = Path(raw_root), Path(out_root)
    source_layout = detect_layout(raw)
    layout = "unpaired" if source_layout == "unpaired" else "paired"
    bad: list[dict] = []
    jobs = _plan(raw, source_layout, bad)
    with atomic_directory(out, overwrite=True) as tmp:
        for split in sorted({j.split for j in jobs} | set(UNPAIRED_SPLITS if layout == "unpaired" else PAIRED_SPLITS)):
            (tmp / split).mkdir()
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            results = list(pool.map(lambda j: _run(j, tmp, resize), jobs))
        files = {}
        for r in results:
            if "bad" in r:
                bad.extend(r["bad"])
            else:
                files[r["rel"]] = {"sha256": r["sha256"], "bytes": r["bytes"], "size": r["size"]}
        if origin is not None:  # the user's own file, not the copy under data/raw/
            bad = [{"path": str(Path(origin) / Path(b["path"]).relative_to(raw)),
                    "reason": b["reason"].replace(str(raw), str(origin))} for b in bad]   # PIL names the file too
        splits = UNPAIRED_SPLITS + tuple(TRUTH_SPLITS) if layout == "unpaired" else PAIRED_SPLITS
        counts = {s: sum(1 for rel in files if rel.split("/", 1)[0] == s) for s in splits}
        truth = layout == "paired" or any(counts.get(t, 0) for t in TRUTH_SPLITS)
        for t in TRUTH_SPLITS:
            if not counts.get(t):  # no truth for this split: neither a count nor a folder
                counts.pop(t, None)
                if (tmp / t).is_dir():
                    (tmp / t).rmdir()
        listing = "\n".join(f"  {b['path']}: {b['reason']}" for b in bad)
        if bad and bad_images == "stop":
            raise BadImagesError(f"{origin or raw}: {len(bad)} bad file(s) (data.bad_images=stop):\n{listing}")
        empty = [s for s in (UNPAIRED_SPLITS if layout == "unpaired" else PAIRED_SPLITS) if counts[s] == 0]
        if empty:
            more = f"; bad files:\n{listing}" if bad else ""
            raise BadImagesError(f"{origin or raw}: no usable images for split(s) {', '.join(empty)}{more}")
        manifest = {"dataset": dataset, "layout": layout, "source_layout": source_layout, "resize": resize,
                    "counts": counts, "truth": truth, "files": dict(sorted(files.items())), "bad_files": bad}
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest
