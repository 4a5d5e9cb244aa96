"""Translate images with one task of a lifelong checkpoint: the user-facing `translate_folder`.

Two small functions are the whole inference path, shared by every caller (the evaluation, the audit,
`piggyback translate`): `load_input_image` turns a file into the network's input, `run_generator` runs a
task's generator on a batch. Everything else here is PNG I/O and the checks that make a folder of a
user's images safe to translate (sizes the generator can map onto themselves, no overwritten files).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from .checkpoint import load_lifelong
from .fsutil import atomic_path
from .progress import track


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_uint8(x: Tensor) -> np.ndarray:
    """Network outputs in [-1, 1], (N, C, H, W) -> the PNG pixels, uint8 (N, H, W, C), rounded."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(path: Path, pixels: np.ndarray) -> Path:
    """Write one uint8 (H, W, 1|3) image as PNG, atomically."""
    img = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def sample_grid(rows: list[Tensor]) -> np.ndarray:
    """Rows of (k, C, H, W) images in [-1, 1] (input / translation / truth) -> one uint8 (H, W, 3) image."""
    from torchvision.utils import make_grid

    rows = [r.float().cpu().expand(-1, 3, -1, -1) if r.shape[1] == 1 else r.float().cpu() for r in rows]
    grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=2, pad_value=1.0)  # (3, H, W)
    return to_uint8(grid[None])[0]


def load_input_image(path: Union[str, Path, BinaryIO], channels: int, size: Optional[int] = None) -> Tensor:
    """A user's image (a file, or file-like bytes) -> the generator's input, (1, C, H, W) in [-1, 1].

    EXIF orientation is applied (what a viewer shows is what is translated), then the image is converted
    to RGB (`channels` 3) or L (1). `size`: resized to size x size as the test transform does (bicubic,
    `data.datasets.test_transform`; the served model); None: no resize, the pixels stay the user's.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("L" if channels == 1 else "RGB")
        if size is not None:
            img = img.resize((size, size), Image.BICUBIC)
        arr = np.array(img, dtype=np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr                           # (H, W, C)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float().div_(127.5).sub_(1.0)


@torch.no_grad()
def run_generator(net: nn.Module, batch: Tensor) -> Tensor:
    """One task's generator (from `LifelongModel.materialize`, in eval mode) on a batch (N, C, H, W) in
    [-1, 1]: the translations, float32 on the CPU, in [-1, 1]. The batch moves to the network's device."""
    weight = next(net.parameters(), None)   # None: a parameterless stand-in (the do-nothing references)
    return net(batch.to(weight.device) if weight is not None else batch).float().cpu()


def input_multiple(netG: str) -> tuple[int, int]:
    """(multiple, minimum) an input side must satisfy for the output to have the input's size.

    ResNet: two stride-2 convs then two stride-2 transposed convs (multiple of 4; the 1/4 map must
    take the blocks' reflection padding, so at least 8). U-Net: num_downs halvings (2^7 / 2^8).
    """
    if netG.startswith("resnet_"):
        return 4, 8
    downs = {"unet_128": 7, "unet_256": 8}[netG]
    return 2 ** downs, 2 ** downs


def _input_files(input_dir: Path, output_dir: Path) -> list[Path]:
    """The images directly in `input_dir`, sorted; an error when there are none or two share a stem."""
    from .data.prepare import is_image

    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input_dir}: no such folder")
    if output_dir.resolve() == input_dir.resolve():
        raise ValueError(f"--output must differ from --input ({input_dir}): PNG inputs would be overwritten")
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and is_image(p))
    if not files:
        raise ValueError(f"--input {input_dir}: no images (png, jpg, jpeg, ... in any case) directly in this folder")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = sorted({p.name for p in files if stems.count(p.stem) > 1})
        raise ValueError(f"--input {input_dir}: several files would be written to the same <stem>.png: {dup[:6]}")
    return files


def _check_sizes(files: list[Path], netG: str) -> None:
    """An error naming every file whose size `netG` cannot map back onto itself (see `input_multiple`)."""
    multiple, minimum = input_multiple(netG)
    bad = []
    for p in files:
        try:
            with Image.open(p) as img:
                w, h = ImageOps.exif_transpose(img).size
        except (OSError, Image.DecompressionBombError) as e:   # a bomb: too many pixels to decode safely
            raise ValueError(f"{p}: not a readable image ({e})") from e
        if w % multiple or h % multiple or min(w, h) < minimum:
            bad.append(f"{p.name} ({w}x{h})")
    if bad:
        raise ValueError(f"{netG} needs width and height multiples of {multiple} (at least {minimum}); resize "
                         f"these images first: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")


def translate_folder(checkpoint: Union[str, Path], task: str, input_dir: Union[str, Path],
                     output_dir: Union[str, Path], which: str = "G_A", device: Any = None) -> list[Path]:
    """Translate every image of `input_dir` with `task` of a checkpoint: ``<output_dir>/<stem>.png``.

    Reads the files directly in `input_dir` (not sub-folders) with an image extension, in any case
    (``.PNG``, ``.JPG``, ``.jpeg``, ...). Images keep their size: a size the generator cannot map back onto
    itself (ResNet: sides multiples of 4, at least 8; U-Net 256: multiples of 256) is an error naming the
    files, raised before anything is written; images are not resized, so the pixels are the user's.
    `which`: "G_A" (the task's direction) or "G_B" (the reverse, CycleGAN tasks). Returns the written paths.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = _input_files(input_dir, output_dir)
    model = load_lifelong(checkpoint)
    try:
        net = model.materialize(task, which)
    except KeyError as e:
        raise ValueError(f"{checkpoint}: {e.args[0]}") from None
    cfg = model.config
    _check_sizes(files, cfg.netG)
    device = torch.device(device) if device is not None else default_device()
    net = net.to(device).eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in track(files, f"translate {task}", "img"):
        x = load_input_image(p, cfg.input_nc)                            # (1, C, H, W)
        y = run_generator(net, x)
        if y.shape[-2:] != x.shape[-2:]:  # a safety net behind input_multiple
            raise ValueError(f"{p}: {cfg.netG} turned {tuple(x.shape[-2:])} into {tuple(y.shape[-2:])}")
        written.append(save_png(output_dir / f"{p.stem}.png", to_uint8(y)[0]))
    return written
