"""Safe extraction: dangerous members are refused, nothing is written outside the target (or at all),
and good archives appear whole with their single top-level folder stripped."""
from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from piggyback.data.archive import ArchiveError, UnsafeArchiveError, member_path, safe_extract

LIMIT = 1 << 20


def _zip(path: Path, members: list[tuple[str, bytes, int]]) -> Path:
    """members: (name, data, unix mode incl. file type bits, or 0)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)  # ZipInfo keeps the name as given, leading '/' included
            info.external_attr = mode << 16
            info.create_system = 3
            zf.writestr(info, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _tarinfo(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


FILE = stat.S_IFREG | 0o644
GOOD = ("maps/trainA/1.jpg", b"img")

ZIP_CASES = {
    "dotdot": [GOOD, ("maps/../../evil.txt", b"pwned", FILE)],
    "absolute": [GOOD, ("/tmp/evil_abs.txt", b"pwned", FILE)],
    "backslash": [GOOD, ("..\\evil.txt", b"pwned", FILE)],
    "symlink": [("maps/link", b"../../evil.txt", stat.S_IFLNK | 0o777), GOOD],
    "fifo": [GOOD, ("maps/pipe", b"", stat.S_IFIFO | 0o644)],
    "too_big": [GOOD, ("maps/trainA/big.bin", b"\0" * (LIMIT + 1), FILE)],
}
TAR_CASES = {
    "dotdot": [GOOD, ("../evil.txt", b"pwned")],
    "absolute": [GOOD, ("/tmp/evil_abs.txt", b"pwned")],
    "symlink": [_tarinfo("maps/link", tarfile.SYMTYPE, "/etc/passwd"), GOOD],
    "hardlink": [GOOD, _tarinfo("maps/hard", tarfile.LNKTYPE, "maps/trainA/1.jpg")],
    "device": [GOOD, _tarinfo("maps/null", tarfile.CHRTYPE)],
    "too_big": [GOOD, ("maps/big.bin", b"\0" * (LIMIT + 1))],
}


def _assert_nothing_written(tmp_path: Path, archive: Path) -> None:
    # Only the archive itself: no target, no temporary folder, no escaped file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]
    assert not Path("/tmp/evil_abs.txt").exists()
    assert not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.parametrize("case", sorted(ZIP_CASES))
def test_zip_refuses_unsafe_members(tmp_path, case):
    archive = _zip(tmp_path / "bad.zip", [m if len(m) == 3 else (*m, FILE) for m in ZIP_CASES[case]])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out", max_bytes=LIMIT)
    _assert_nothing_written(tmp_path, archive)


@pytest.mark.parametrize("case", sorted(TAR_CASES))
def test_tar_refuses_unsafe_members(tmp_path, case):
    archive = _tar(tmp_path / "bad.tar.gz", TAR_CASES[case])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out", max_bytes=LIMIT)
    _assert_nothing_written(tmp_path, archive)


def test_member_names():
    assert member_path("./maps/trainA/a.jpg") == Path("maps/trainA/a.jpg")
    assert member_path("__MACOSX/maps/._a.jpg") is None and member_path("./") is None
    for bad in ("/etc/passwd", "C:/x", "a/../../b", "a\\..\\b", "a\0b"):
        with pytest.raises(UnsafeArchiveError):
            member_path(bad)


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_good_archive_extracts_whole_and_strips_top(tmp_path, fmt):
    members = [("facades/train/1.jpg", b"one"), ("facades/test/2.jpg", b"two"), ("facades/val/", b"")]
    if fmt == "zip":
        archive = _zip(tmp_path / "a.zip", [(n, d, FILE if d else stat.S_IFDIR | 0o755) for n, d in members]
                       + [("__MACOSX/facades/._1.jpg", b"junk", FILE)])
    else:
        archive = _tar(tmp_path / "a.tar.gz", [m for m in members if m[1]] + [_tarinfo("facades/val", tarfile.DIRTYPE)])
    seen = []
    out = safe_extract(archive, tmp_path / "out", max_bytes=LIMIT, finalize=lambda root: seen.append(root.name))
    assert (out / "train/1.jpg").read_bytes() == b"one" and (out / "test/2.jpg").read_bytes() == b"two"
    assert (out / "val").is_dir() and not (out / "__MACOSX").exists() and seen == ["facades"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archive.name, "out"])
    with pytest.raises(FileExistsError):
        safe_extract(archive, out, max_bytes=LIMIT)
    safe_extract(archive, out, max_bytes=LIMIT, strip_top=False, overwrite=True)
    assert (out / "facades/train/1.jpg").is_file()


def test_failed_finalize_and_corrupt_archive_leave_nothing(tmp_path):
    archive = _zip(tmp_path / "a.zip", [("x/1.jpg", b"one", FILE)])

    def reject(root):
        raise ValueError("wrong layout")

    with pytest.raises(ValueError, match="wrong layout"):
        safe_extract(archive, tmp_path / "out", max_bytes=LIMIT, finalize=reject)
    _assert_nothing_written(tmp_path, archive)
    broken = tmp_path / "broken.tar.gz"
    whole = _tar(tmp_path / "t.tar.gz", [("x/1.jpg", os.urandom(5000)), ("x/2.jpg", os.urandom(5000))]).read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])  # cut inside the member data
    (tmp_path / "t.tar.gz").unlink()
    with pytest.raises(ArchiveError):
        safe_extract(broken, tmp_path / "out", max_bytes=LIMIT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "broken.tar.gz"]
