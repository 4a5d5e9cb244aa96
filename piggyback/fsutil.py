"""Atomic, hash-checked file writes shared by every stage: nothing half-written is ever left behind.

A write goes to a temporary sibling and is renamed into place (`os.replace` is atomic on POSIX), so a
killed stage leaves either the old file or the new one. Folders appear whole the same way.

Every temporary file or folder is named ``.<name>.<8 random chars>.tmp`` (TEMP_GLOB, listed in
.dvcignore so DVC never hashes one); a stage killed mid-write may leave one behind, which
`remove_stale_temps` deletes at the next start. Outputs get the modes of ordinary files (0644 / 0755
under umask 022), not the private 0600 / 0700 of `tempfile`, so a shared cache or results folder stays
readable. A write that runs out of disk space raises DiskFullError naming the path, the old file intact.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

TEMP_GLOB = ".*.tmp"                                      # The pattern in .dvcignore.
# What `tempfile` makes of our prefix and suffix (".old": swapped-out folders of earlier versions).
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.(tmp|old)")


_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the path and the bytes it needed."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)   # The only portable way to read it is to set it; put it straight back.
    os.umask(mask)
    return mask


def temp_beside(path: str | Path, folder: bool = False) -> Path:
    """A new empty temporary file (or folder) beside `path`, named by TEMP_GLOB, with umask-following mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = dict(prefix=f".{path.name[:80]}.", suffix=".tmp", dir=path.parent)
    if folder:
        tmp = Path(tempfile.mkdtemp(**opts))
        os.chmod(tmp, 0o777 & ~_umask())
    else:
        fd, name = tempfile.mkstemp(**opts)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporaries that killed writers left anywhere under `folder`; returns what was removed.

    Call it at the start of a stage, before anything writes there: a temporary of a running writer
    in the same folder would be removed too.
    """
    removed: list[Path] = []
    for root, dirs, files in os.walk(folder):   # a missing folder yields nothing
        for name in [d for d in dirs if _TEMP_NAME.fullmatch(d)]:
            dirs.remove(name)                       # removed whole: do not walk into it
            shutil.rmtree(Path(root) / name, ignore_errors=True)
            removed.append(Path(root) / name)
        for name in files:
            if _TEMP_NAME.fullmatch(name):
                (Path(root) / name).unlink(missing_ok=True)
                removed.append(Path(root) / name)
    return removed


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch.save reports a short write of its zip container as a RuntimeError ("unexpected pos ...").
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_SHORT_WRITE)


@contextlib.contextmanager
def atomic_path(path: str | Path, nbytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    `nbytes` (the size about to be written, when known) goes into the DiskFullError message.
    """
    path = Path(path)
    tmp = temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not _disk_full(e):
            raise
        free = shutil.disk_usage(path.parent).free
        need = f"about {nbytes} bytes" if nbytes is not None else f"more than the {free} bytes free"
        raise DiskFullError(f"{path}: no space left on the device to write it ({need}, {free} bytes free); "
                            f"the previous {path.name} is unchanged. Free some space and run again.") from e
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted-free, stable formatting (indent 2, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) dict / list / tuple: about what torch.save writes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch

    with atomic_path(path, _tensor_bytes(obj)) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling and rename it to `path` when the block succeeds.

    With ``overwrite=False`` an existing `path` is an error (finished outputs are never replaced);
    with ``overwrite=True`` the old folder is swapped out and removed only after the new one is in place,
    and put back if the new one cannot be moved in.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite a finished output")
    tmp = temp_beside(path, folder=True)
    try:
        yield tmp
        if path.exists():
            old = temp_beside(path, folder=True)
            os.replace(path, old / "x")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "x", path)      # put the old folder back before reporting the failure
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
