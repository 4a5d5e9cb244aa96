"""Hostile conditions, the file system: outputs follow the umask (0644 / 0755 under 022, not 0600 / 0700),
a full disk gives one error naming the path and the bytes with the previous file intact, a failed folder
swap puts the old folder back, and temporaries carry one pattern that .dvcignore and
`remove_stale_temps` know."""
from __future__ import annotations

import errno
import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import torch

from piggyback import fsutil
from piggyback.data.archive import safe_extract
from piggyback.fsutil import (DiskFullError, atomic_directory, atomic_torch_save, atomic_write_json,
                              atomic_write_text, remove_stale_temps, temp_beside)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_torch_save(tmp_path / "t.pt", {"w": torch.zeros(2)})
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("top/f.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    safe_extract(tmp_path / "a.tar.gz", tmp_path / "x", 1 << 20)
    for f in ("a.json", "t.pt", "d/f", "x/f.txt"):
        assert _mode(tmp_path / f) == 0o666 & ~umask, f
    for d in ("d", "x"):
        assert _mode(tmp_path / d) == 0o777 & ~umask, d


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((Path(src), Path(dst)))
        if Path(dst) == tmp_path / "out" and len(calls) == 2:   # the second rename: new folder into place
            raise OSError(errno.EIO, "simulated I/O error")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]        # no temporaries left


def test_disk_full_while_writing_keeps_the_old_file_and_names_path_and_bytes(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    atomic_write_text(target, "old")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError, match=f"{target}: no space left.*about 5 bytes"):
        atomic_write_text(target, "newer")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_torch_save_short_write_is_a_disk_full_error(tmp_path, monkeypatch):
    target = tmp_path / "s.pt"
    atomic_torch_save(target, {"w": torch.ones(3)})

    def short(obj, f):
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", short)
    with pytest.raises(DiskFullError, match=f"{target}: .*about 400 bytes"):
        atomic_torch_save(target, {"w": torch.zeros(100)})
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def test_other_errors_are_not_called_disk_full(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with fsutil.atomic_path(tmp_path / "x"):
            raise ValueError("boom")
    with pytest.raises(RuntimeError, match="unrelated"):
        with fsutil.atomic_path(tmp_path / "x"):
            raise RuntimeError("unrelated")
    assert list(tmp_path.iterdir()) == []


def test_temporaries_match_the_dvcignore_pattern_and_are_cleaned(tmp_path):
    assert fsutil.TEMP_GLOB in (ROOT / ".dvcignore").read_text().split("\n")
    (tmp_path / "sub").mkdir()
    stale = [temp_beside(tmp_path / "meta.json"), temp_beside(tmp_path / "sub" / "t1", folder=True)]
    (stale[1] / "inner.pt").write_bytes(b"x")
    stale.append(tmp_path / ".t1.k2j4_x9a.old")          # a swapped-out folder of an earlier version
    stale[2].mkdir()
    keep = [tmp_path / ".snapshots", tmp_path / "x.tmp", tmp_path / ".dvcignore", tmp_path / ".a.tmp"]
    keep[0].mkdir()
    for k in keep[1:]:
        k.write_text("k")
    for s in stale[:2]:
        assert s.match(fsutil.TEMP_GLOB), s
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(not s.exists() for s in stale) and all(k.exists() for k in keep)
    assert remove_stale_temps(tmp_path) == []
