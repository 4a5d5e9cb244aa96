"""Safe extraction of the dataset archives (zip for CycleGAN, tar.gz for pix2pix).

Python's own `extractall` trusts member names; this module does not. A member is refused when its name is
absolute or has a `..` component, when it is a symlink, hardlink, device or fifo, or when the archive
expands beyond a byte limit (declared sizes are checked before a member is written and bytes are counted
while writing, so a lying header does not help) or a member count. Integrity is verified while reading:
the CRC of every zip member, the gzip/bz2/xz checksums and lengths (the compressed stream is read to its
end), and the tar end-of-archive marker (a tar cut at a member boundary otherwise reads as complete).
Every failure is an ArchiveError naming the archive and what to do. Everything is extracted into a
temporary sibling of the destination, which is renamed into place only when the whole archive went well:
an interrupted or refused extraction leaves nothing behind and never writes outside that sibling.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Optional

from piggyback.fsutil import atomic_directory, temp_beside

# Entries that zip tools add and that are never data (macOS resource forks, Finder metadata).
JUNK_TOP = {"__MACOSX"}
JUNK_NAMES = {".DS_Store", "Thumbs.db"}
COPY_CHUNK = 1 << 20
MAX_MEMBERS = 200_000     # Cityscapes, the largest archive we read, has about 25 000 members.
# What a damaged compressed stream or zip member raises while being read (BadGzipFile is an OSError).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, gzip.BadGzipFile, lzma.LZMAError, tarfile.TarError,
                NotImplementedError)
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


class ArchiveError(ValueError):
    """The archive cannot be read or extracted; the message names the archive."""


class UnsafeArchiveError(ArchiveError):
    """A member would escape the destination, is a link or device, or the archive is too large."""


def corrupt(archive: str | Path, detail: str) -> ArchiveError:
    """The one error for a damaged archive: names it and says what to do."""
    return ArchiveError(f"{archive}: damaged or incomplete archive ({detail}); nothing was extracted. "
                        "Delete it and run again to download it afresh (or replace it by a good copy).")


class _Checked:
    """A readable stream whose decoding errors become `corrupt(...)`; tracks the bytes read and the last
    non-zero one, so that the tar reader can check that only zero blocks follow the last member."""

    def __init__(self, raw: BinaryIO, archive: Path):
        self.raw, self.archive = raw, archive
        self.pos = 0            # Bytes delivered so far.
        self.data_end = 0       # Offset just past the last non-zero byte delivered.

    def read(self, n: int = -1) -> bytes:
        try:
            block = self.raw.read(n)
        except _READ_ERRORS as e:
            raise corrupt(self.archive, f"{type(e).__name__}: {e}") from e
        except OSError as e:    # bz2 reports a bad stream as a plain OSError
            raise corrupt(self.archive, f"read error: {e}") from e
        kept = len(block.rstrip(b"\0"))
        if kept:
            self.data_end = self.pos + kept
        self.pos += len(block)
        return block

    def drain(self) -> None:
        """Read to the end: decompressors check the CRC and length only there."""
        while self.read(COPY_CHUNK):
            pass


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


def _count(archive: Path, n: int, max_members: int) -> None:
    if n > max_members:
        raise UnsafeArchiveError(f"{archive}: more than {max_members} members; refusing it (an archive bomb?)")


def _check_zip_member(archive: Path, info: zipfile.ZipInfo) -> None:
    kind = _zip_kind(info)
    if kind in ("symlink", "device"):
        raise UnsafeArchiveError(f"{archive}: refusing {kind} member {info.filename!r}")
    if kind == "dir" and info.file_size:   # the central directory has no checksum: a flipped mode bit
        raise corrupt(archive, f"folder member {info.filename!r} holds {info.file_size} bytes")
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{archive}: member {info.filename!r} is encrypted; extract the archive by hand with "
                           "its password and use source: folder")
    if info.compress_type not in _ZIP_METHODS:
        raise ArchiveError(f"{archive}: member {info.filename!r} uses compression method {info.compress_type}, "
                           "which Python cannot read; repack the archive (zip -r) and run again")


def _declared_members(zf: zipfile.ZipFile) -> Optional[int]:
    """The member count of the end-of-central-directory record (zipfile reads it but keeps it private)."""
    end = zipfile._EndRecData(zf.fp)  # noqa: SLF001
    return end[zipfile._ECD_ENTRIES_TOTAL] if end else None  # noqa: SLF001


def _extract_zip(archive: Path, writer: _Writer, max_members: int) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, *_READ_ERRORS) as e:
        raise corrupt(archive, f"not a readable zip: {e}") from e
    with zf:
        # Validate every member before writing the first byte: the central directory is cheap to read.
        _count(archive, len(zf.infolist()), max_members)
        declared = _declared_members(zf)
        if declared is not None and declared != len(zf.infolist()):   # e.g. a damaged comment length hid some
            raise corrupt(archive, f"the central directory declares {declared} members, {len(zf.infolist())} "
                                   "could be read")
        plan = []
        for info in zf.infolist():
            _check_zip_member(archive, info)
            rel = member_path(info.filename, archive)
            if rel is not None:
                writer.declare(rel, info.file_size)
                plan.append((rel, info))
        for rel, info in plan:
            if _zip_kind(info) == "dir":
                writer.mkdir(rel)
                continue
            try:
                src = zf.open(info)
            except (*_READ_ERRORS, RuntimeError, OSError) as e:  # RuntimeError: encrypted despite its flags;
                                                                 # OSError: a member offset before the start
                raise corrupt(archive, f"member {info.filename!r}: {e}") from e
            with src:                                   # ZipExtFile checks the member's CRC at its end
                writer.write(rel, _Checked(src, archive))


def _decompressed(f: BinaryIO) -> BinaryIO:
    """`f` (at its start) through the decompressor its magic bytes name, or `f` itself for a plain tar."""
    magic = f.read(6)
    f.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=f, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(f)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(f)
    return f


def _extract_tar(archive: Path, writer: _Writer, max_members: int) -> None:
    # Stream mode reads the (possibly multi-GB) archive once; each header is checked before its data is
    # written, and the temporary folder is dropped if a later member is refused. Decompression is ours
    # (not tarfile's), so that the stream is read to its end and its checksum verified.
    with open(archive, "rb") as f:
        stream = _Checked(_decompressed(f), archive)
        try:
            tf = tarfile.open(fileobj=stream, mode="r|")
        except tarfile.TarError as e:
            raise corrupt(archive, f"not a readable tar: {e}") from e
        with tf:
            _extract_members(archive, tf, writer, max_members)
            end = tf.offset                         # where the header after the last member starts
        stream.drain()
    # POSIX ends a tar with two zero blocks; tarfile stops quietly at the end of data or at a bad header.
    if stream.data_end > end or stream.pos - end < 2 * tarfile.BLOCKSIZE:
        raise corrupt(archive, f"no end-of-archive marker after byte {end} of the tar: cut short, or a "
                               "damaged header")


def _extract_members(archive: Path, tf: tarfile.TarFile, writer: _Writer, max_members: int) -> None:
    n = 0
    try:
        for m in tf:
            n += 1
            _count(archive, n, max_members)
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
    except (tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        raise corrupt(archive, f"tar: {e}") from e


def _single_top(folder: Path) -> Path:
    """The only sub-folder of `folder` when nothing else is there (``maps/trainA/...``), else `folder`."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


def safe_extract(archive: str | Path, dest: str | Path, max_bytes: int, strip_top: bool = True,
                 overwrite: bool = False, finalize: Optional[Callable[[Path], None]] = None,
                 max_members: int = MAX_MEMBERS) -> Path:
    """Extract `archive` (zip or tar[.gz]) so that `dest` appears whole or not at all.

    Args:
        archive: the archive file.
        dest: the folder to create; it must not exist unless `overwrite`.
        max_bytes: refuse archives whose members add up to more than this (declared or written).
        max_members: refuse archives with more members than this.
        strip_top: when every member sits in one top-level folder (``horse2zebra/trainA/...``), drop it.
        overwrite: replace an existing `dest` (the old one is removed only after the new one is in place).
        finalize: called with the extracted folder before it is renamed to `dest` (check the layout, add
            files); an exception there leaves nothing behind, like a refused member.

    Returns:
        `dest`.

    Raises:
        UnsafeArchiveError: a dangerous member or an archive over the limit; nothing is left behind.
        ArchiveError: unreadable, damaged or truncated archive (checksums, end marker), encrypted member.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such archive")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = temp_beside(dest, folder=True)
    try:
        writer = _Writer(archive, work / "x", max_bytes)
        extract = _extract_zip if archive_type(archive) == "zip" else _extract_tar
        extract(archive, writer, max_members)
        root = _single_top(writer.base) if strip_top else writer.base
        if finalize is not None:
            finalize(root)
        with atomic_directory(dest, overwrite=overwrite) as tmp:
            os.replace(root, tmp)  # Renaming onto the empty temporary folder is allowed on POSIX.
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
