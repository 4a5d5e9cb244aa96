"""Fetch a dataset into data/raw/<key>: HTTP download with resume, checksums, safe extraction.

The Berkeley servers publish no checksums: the SHA-256 of the first download is recorded
beside the archive (``data/downloads/<file>.sha256``, sha256sum format) and checked whenever the archive is
used again; a hash pinned in params.yaml (``datasets.<key>.sha256``) is checked too. Downloads stream
into ``<file>.part`` and resume it with an HTTP Range request, retry with exponential backoff, and fail
after `timeout` seconds without data. Only http(s) URLs are fetched, and a download is stopped as soon as it
passes `data.max_download_bytes` (a missing or lying Content-Length does not help). Offline, they fail at once with the URL and the path where the
archive can be put by hand; an archive found there is used (and hashed) instead of downloading.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from piggyback.config import DataConfig, DatasetConfig, check_name
from piggyback.data import cityscapes, embedded
from piggyback.data.archive import ArchiveError, UnsafeArchiveError, safe_extract
from piggyback.data.prepare import PAIRED_SPLITS, UNPAIRED_SPLITS, detect_layout
from piggyback.data.registry import archive_filename, lookup
from piggyback.fsutil import atomic_directory, atomic_write_json, atomic_write_text, sha256_file

CHUNK = 1 << 16
USER_AGENT = "piggyback-gan-data/0.1 (+urllib)"
_UNREACHABLE = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}


class DownloadError(RuntimeError):
    """A download failed; the message names the URL and where to put the file by hand."""


class DownloadTimeoutError(DownloadError):
    """No data for `timeout` seconds, on every attempt."""


class OfflineError(DownloadError):
    """The host cannot be resolved or reached: no retries, fail fast."""


class ChecksumError(DownloadError):
    """The file's SHA-256 differs from the pinned or recorded one."""


def manual_hint(url: str, dest: Path) -> str:
    return (f"Download {url} by other means and put it at {dest} (absolute: {dest.resolve()}); "
            f"the next run uses that file and records its SHA-256 in {dest}.sha256.")


def _unreachable(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, socket.gaierror):
        return True  # name resolution failed: no network (or a typo in the URL)
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (TimeoutError, socket.timeout)) or isinstance(getattr(exc, "reason", None), TimeoutError)


class _Retry(Exception):
    """A transient failure (short read, 5xx); the partial file is kept for the next attempt."""


def _too_large(url: str, part: Path, size: int, max_bytes: int) -> DownloadError:
    part.unlink(missing_ok=True)
    return DownloadError(f"{url} is larger than data.max_download_bytes ({size} > {max_bytes} bytes); the download "
                         "was stopped and deleted. Raise data.max_download_bytes in params.yaml if the file is trusted")


def _attempt(url: str, part: Path, timeout: float, desc: str, max_bytes: Optional[int] = None) -> None:
    """One request; continues `part` with a Range request when it exists. Returns when `part` is complete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Range not satisfiable: the partial file already holds everything (or is garbage).
            if (e.headers.get("Content-Range") or "").strip() == f"bytes */{offset}":
                return
            part.unlink()
            raise _Retry(f"HTTP 416 for a resume at byte {offset}; restarting from scratch") from e
        if e.code in (408, 425, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"HTTP {e.code} {e.reason} for {url}") from e
    with resp:
        if offset and resp.status == 206:
            if not (resp.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"):
                part.unlink()
                raise _Retry(f"asked for bytes {offset}- but got {resp.headers.get('Content-Range')!r}")
            mode = "ab"
        else:  # a fresh download, or a server without Range support (200): start from byte 0
            mode, offset = "wb", 0
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if max_bytes is not None and length is not None and offset + length > max_bytes:
            raise _too_large(url, part, offset + length, max_bytes)
        got = 0
        with open(part, mode) as f, tqdm(total=None if length is None else offset + length, initial=offset,
                                         unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                                         disable=None, leave=False) as bar:
            while block := resp.read(CHUNK):
                got += len(block)
                if max_bytes is not None and offset + got > max_bytes:
                    f.close()
                    raise _too_large(url, part, offset + got, max_bytes)
                f.write(block)
                bar.update(len(block))
    if length is not None and got < length:
        raise _Retry(f"connection closed after {offset + got} of {offset + length} bytes")


def download_file(url: str, dest: str | Path, timeout: float = 60.0, retries: int = 4,
                  sha256: Optional[str] = None, backoff: float = 1.0, max_bytes: Optional[int] = None) -> str:
    """Stream `url` to `dest` through ``dest.part`` (resumed with Range); return the file's SHA-256.

    Args:
        timeout: seconds without data (connect or read) before an attempt fails.
        retries: attempts in all; the wait between attempts doubles from `backoff` seconds.
        sha256: expected hex digest; on mismatch the download is deleted and ChecksumError raised.
        max_bytes: stop (and delete the download) once it is larger than this.

    Raises:
        OfflineError (at once), DownloadTimeoutError, ChecksumError, DownloadError.
    """
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise DownloadError(f"{url}: only http:// and https:// URLs are downloaded; put a local archive at {dest} "
                            "by hand, or use source: folder")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: Optional[BaseException] = None
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _attempt(url, part, timeout, desc=dest.name, max_bytes=max_bytes)
            last = None
            break
        except DownloadError as e:
            raise DownloadError(f"{e}. {manual_hint(url, dest)}") from e
        except (urllib.error.URLError, OSError, HTTPException, _Retry) as e:
            if _unreachable(e):
                raise OfflineError(f"cannot reach {url} ({getattr(e, 'reason', e)}): offline? "
                                   f"{manual_hint(url, dest)}") from e
            last = e
    if last is not None:
        cls = DownloadTimeoutError if _is_timeout(last) else DownloadError
        what = f"no data for {timeout:g} s" if cls is DownloadTimeoutError else str(last)
        kept = f" The partial file {part} is kept and resumed next time." if part.exists() else ""
        raise cls(f"download of {url} failed after {max(1, retries)} attempt(s): {what}.{kept} "
                  f"{manual_hint(url, dest)}") from last
    digest = sha256_file(part)
    if sha256 and digest != sha256.lower():
        part.unlink()
        raise ChecksumError(f"{url}: downloaded SHA-256 {digest} differs from the expected {sha256.lower()}; "
                            f"the download was deleted. Check datasets.<key>.sha256 or {dest}.sha256.")
    os.replace(part, dest)
    return digest


def _read_record(record: Path) -> Optional[str]:
    if not record.is_file():
        return None
    text = record.read_text().split()
    return text[0].lower() if text else None


def fetch_archive(url: str, downloads_dir: str | Path = "data/downloads", timeout: float = 60.0, retries: int = 4,
                  sha256: Optional[str] = None, backoff: float = 1.0,
                  max_bytes: Optional[int] = None) -> tuple[Path, str]:
    """Download `url` into `downloads_dir` unless it is already there; return (path, SHA-256).

    A file already present (from an earlier run, or put there by hand) is hashed and checked against
    the pinned hash and the recorded one; the first hash seen is recorded in ``<file>.sha256``.
    """
    dest = Path(downloads_dir) / archive_filename(url)
    record = dest.with_name(dest.name + ".sha256")
    recorded = _read_record(record)
    pinned = sha256.lower() if sha256 else None
    if dest.is_file():
        digest = sha256_file(dest)
        for expected, origin in [(pinned, "params.yaml (datasets.<key>.sha256)"), (recorded, str(record))]:
            if expected and digest != expected:
                raise ChecksumError(f"{dest}: SHA-256 {digest} differs from {expected} recorded in {origin}; "
                                    f"the file is corrupt or not the one from {url}. Delete it to download again.")
    else:
        digest = download_file(url, dest, timeout, retries, sha256=pinned or recorded, backoff=backoff,
                               max_bytes=max_bytes)
    if recorded != digest:
        atomic_write_text(record, f"{digest}  {dest.name}\n")
    return dest, digest


def _copy_folder(src: Path, dest: Path) -> str:
    """Copy the layout folders of a user dataset into `dest` (atomically); return the layout."""
    layout = detect_layout(src)
    keep = {"unpaired": UNPAIRED_SPLITS + ("testA_truth", "testB_truth"), "paired": PAIRED_SPLITS + ("val",),
            "folders": ("A", "B")}[layout]
    with atomic_directory(dest, overwrite=True) as tmp:
        for name in keep:
            if (src / name).is_dir():  # symlinked images are copied as files (a copy is safest for DVC)
                shutil.copytree(src / name, tmp / name, symlinks=False)
        detect_layout(tmp)
    return layout


def fetch_dataset(key: str, ds: DatasetConfig, data: DataConfig, seed: int = 0, raw_root: str | Path = "data/raw",
                  downloads_dir: str | Path = "data/downloads", backoff: float = 1.0) -> dict:
    """Materialise dataset `key` in ``raw_root/key`` (it appears whole or not at all); return a summary."""
    dest = Path(raw_root) / check_name("datasets key", key)
    info: dict = {"dataset": key, "source": ds.source}
    if ds.source == "embedded":
        if not ds.kind:
            raise ValueError(f"datasets.{key}.kind: required for source=embedded "
                             f"(one of {', '.join(embedded.EMBEDDED_KINDS)})")
        info.update(embedded.generate(ds.kind, dest, seed=seed, size=ds.size, n_train=ds.n_train, n_test=ds.n_test))
    elif ds.source in ("cyclegan", "pix2pix"):
        spec = lookup(ds.source, ds.name or key, ds.url)
        archive, digest = fetch_archive(spec.url, downloads_dir, data.download_timeout, data.download_retries,
                                        sha256=ds.sha256, backoff=backoff, max_bytes=data.max_download_bytes)
        info.update(url=spec.url, archive=str(archive), sha256=digest)

        def finalize(root: Path) -> None:  # runs on the extracted folder before it becomes `dest`
            try:
                info["layout"] = detect_layout(root)
            except ValueError as e:
                raise ValueError(f"{archive} (from {spec.url}) does not hold a {spec.layout} dataset: {e}") from e
            atomic_write_json(root / "source.json", info)

        try:
            safe_extract(archive, dest, data.max_download_bytes, overwrite=True, finalize=finalize)
        except ArchiveError as e:
            if not isinstance(e, UnsafeArchiveError):   # damaged: its recorded hash must not vouch for it
                archive.with_name(archive.name + ".sha256").unlink(missing_ok=True)
            raise
    elif ds.source == "cityscapes":
        folder = ds.path or cityscapes.DEFAULT_DIR
        info.update(zips=folder, counts=cityscapes.build_cityscapes(folder, dest, max_bytes=data.max_download_bytes))
    elif ds.source == "folder":
        if not ds.path:
            raise ValueError(f"datasets.{key}.path: required for source=folder (the folder holding your dataset)")
        info.update(path=ds.path, layout=_copy_folder(Path(ds.path), dest))
    else:
        raise ValueError(f"datasets.{key}.source: unknown source {ds.source!r}")
    return info
