"""Safe extraction of the dataset archives (zip for CycleGAN, tar.gz for pix2pix).

Python's own `extractall` trusts member names; this module does not. A member is refused when its name is
absolute or has a `..` component, when it is a symlink, hardlink, device or fifo, or when the archive
expands beyond a byte limit (declared sizes are checked before a member is written and bytes are counted
while writing, so a lying header does not help). Everything is extracted into a temporary sibling of the
destination, which is renamed into place only when the whole archive went well: an interrupted or refused
extraction leaves nothing behind and never writes outside that sibling.
"""
from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Optional

from piggyback.fsutil import atomic_directory

# Entries that zip tools add and that are never data (macOS resource forks, Finder metadata).
JUNK_TOP = {"__MACOSX"}
JUNK_NAMES = {".DS_Store", "Thumbs.db"}
COPY_CHUNK = 1 << 20


class ArchiveError(ValueError):
    """The archive cannot be read or extracted; the message names the archive."""


class UnsafeArchiveError(ArchiveError):
    """A member would escape the destination, is a link or device, or the archive is too large."""


def member_path(name: str, archive: str | Path = "archive") -> Optional[PurePosixPath]:
    """Validate a member name and return it as a relative path (None for the root entry or junk).

    Backslashes count as separators, so ``..\\evil`` is refused like ``../evil``.

    Raises:
        UnsafeArchiveError: absolute path, drive letter, ``..`` component or NUL byte.
    """
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member name with a NUL byte: {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member with an absolute path: {name!r}")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member with a '..' component: {name!r}")
    if not parts or parts[0] in JUNK_TOP or parts[-1] in JUNK_NAMES:
        return None
    return PurePosixPath(*parts)


def archive_type(path: str | Path) -> str:
    """"zip" or "tar" from the file name, falling back to the content."""
    lower = str(path).lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ArchiveError(f"{path}: neither a zip nor a tar archive")


class _Writer:
    """Writes members below `base`, keeping a running byte count against `max_bytes`."""

    def __init__(self, archive: Path, base: Path, max_bytes: int):
        self.archive, self.base, self.max_bytes = archive, base, max_bytes
        self.declared = 0   # Sum of the sizes the headers announce.
        self.written = 0    # Bytes actually written.
        self.base.mkdir(parents=True, exist_ok=True)
        self._root = os.path.realpath(self.base)

    def _target(self, rel: PurePosixPath) -> Path:
        target = self.base.joinpath(*rel.parts)
        # Belt and braces: the name checks already exclude escapes, and we never create links.
        if not os.path.realpath(target).startswith(self._root + os.sep):
            raise UnsafeArchiveError(f"{self.archive}: member {str(rel)!r} resolves outside the target")
        return target

    def declare(self, rel: PurePosixPath, size: int) -> None:
        self.declared += max(0, size)
        if self.declared > self.max_bytes:
            raise UnsafeArchiveError(
                f"{self.archive}: expands beyond the limit of {self.max_bytes} bytes (at member {str(rel)!r}); "
                "raise data.max_download_bytes in params.yaml if the archive is trusted")

    def mkdir(self, rel: PurePosixPath) -> None:
        self._target(rel).mkdir(parents=True, exist_ok=True)

    def write(self, rel: PurePosixPath, src: BinaryIO) -> None:
        target = self._target(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            while block := src.read(COPY_CHUNK):
                self.written += len(block)
                if self.written > self.max_bytes:
                    raise UnsafeArchiveError(
                        f"{self.archive}: more than {self.max_bytes} bytes written (member {str(rel)!r} is "
                        "larger than its header says, or the archive exceeds data.max_download_bytes)")
                out.write(block)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # Unix mode bits, when the archive was made on Unix.
    if mode and stat.S_ISLNK(mode):
        return "symlink"
    if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return "device"
    return "dir" if info.is_dir() or (mode and stat.S_ISDIR(mode)) else "file"


def _extract_zip(archive: Path, writer: _Writer) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{archive}: not a readable zip archive: {e}") from e
    with zf:
        # Validate every member before writing the first byte: the central directory is cheap to read.
        plan = []
        for info in zf.infolist():
            rel = member_path(info.filename, archive)
            kind = _zip_kind(info)
            if kind in ("symlink", "device"):
                raise UnsafeArchiveError(f"{archive}: refusing {kind} member {info.filename!r}")
            if rel is not None:
                writer.declare(rel, info.file_size)
                plan.append((rel, kind, info))
        for rel, kind, info in plan:
            if kind == "dir":
                writer.mkdir(rel)
            else:
                with zf.open(info) as src:
                    writer.write(rel, src)


def _extract_tar(archive: Path, writer: _Writer) -> None:
    # Stream mode reads the (possibly multi-GB) archive once; each header is checked before its data is
    # written, and the temporary folder is dropped if a later member is refused.
    try:
        tf = tarfile.open(archive, mode="r|*")
    except (tarfile.TarError, OSError) as e:
        raise ArchiveError(f"{archive}: not a readable tar archive: {e}") from e
    with tf:
        try:
            for m in tf:
                rel = member_path(m.name, archive)
                if m.issym() or m.islnk():
                    kind = "symlink" if m.issym() else "hardlink"
                    raise UnsafeArchiveError(f"{archive}: refusing {kind} member {m.name!r} -> {m.linkname!r}")
                if m.ischr() or m.isblk() or m.isfifo():
                    raise UnsafeArchiveError(f"{archive}: refusing device/fifo member {m.name!r}")
                if not (m.isreg() or m.isdir()):
                    raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r} of tar type {m.type!r}")
                if rel is None:
                    continue
                writer.declare(rel, m.size)
                if m.isdir():
                    writer.mkdir(rel)
                else:
                    src = tf.extractfile(m)
                    assert src is not None  # Regular members always have data.
                    writer.write(rel, src)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ArchiveError(f"{archive}: corrupt or truncated tar archive: {e}") from e


def _single_top(folder: Path) -> Path:
    """The only sub-folder of `folder` when nothing else is there (``maps/trainA/...``), else `folder`."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


def safe_extract(archive: str | Path, dest: str | Path, max_bytes: int, strip_top: bool = True,
                 overwrite: bool = False, finalize: Optional[Callable[[Path], None]] = None) -> Path:
    """Extract `archive` (zip or tar[.gz]) so that `dest` appears whole or not at all.

    Args:
        archive: the archive file.
        dest: the folder to create; it must not exist unless `overwrite`.
        max_bytes: refuse archives whose members add up to more than this (declared or written).
        strip_top: when every member sits in one top-level folder (``horse2zebra/trainA/...``), drop it.
        overwrite: replace an existing `dest` (the old one is removed only after the new one is in place).
        finalize: called with the extracted folder before it is renamed to `dest` (check the layout, add
            files); an exception there leaves nothing behind, like a refused member.

    Returns:
        `dest`.

    Raises:
        UnsafeArchiveError: a dangerous member or an archive over the limit; nothing is left behind.
        ArchiveError: unreadable or corrupt archive.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such archive")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent))
    try:
        writer = _Writer(archive, work / "x", max_bytes)
        if archive_type(archive) == "zip":
            _extract_zip(archive, writer)
        else:
            _extract_tar(archive, writer)
        root = _single_top(writer.base) if strip_top else writer.base
        if finalize is not None:
            finalize(root)
        with atomic_directory(dest, overwrite=overwrite) as tmp:
            os.replace(root, tmp)  # Renaming onto the empty temporary folder is allowed on POSIX.
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
