"""prepare: bad files are reported by path and skipped or stop the stage; modes become RGB; layouts are
normalised (val as test, A/ B/ folders combined); Cityscapes is built from two tiny fake zips."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piggyback.data.cityscapes import GTFINE_ZIP, LEFTIMG_ZIP, CityscapesMissingError, build_cityscapes
from piggyback.data.prepare import BadImagesError, LayoutError, detect_layout, prepare_dataset


def _img(path: Path, colour=(10, 200, 30), size=(16, 12), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path, format=fmt)
    return path


def _noise_jpeg(path: Path, size=64) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path) -> Path:
    """An unpaired folder: good images in odd modes and upper-case names, plus three bad files."""
    raw = tmp_path / "raw"
    _img(raw / "trainA/rgb.png")
    _img(raw / "trainA/UPPER.JPG", fmt="JPEG")
    _img(raw / "trainA/sub/palette.png", mode="P")
    _img(raw / "trainA/rgba.png", mode="RGBA")
    _img(raw / "trainA/cmyk.jpg", mode="CMYK", fmt="JPEG")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(raw / "trainA/grey16.png")
    data = _noise_jpeg(raw / "trainA/truncated.jpg")
    (raw / "trainA/truncated.jpg").write_bytes(data[: len(data) // 2])
    (raw / "trainA/text.png").write_text("this is not an image\n")
    (raw / "trainA/empty.PNG").write_bytes(b"")
    (raw / "trainA/notes.txt").write_text("ignored: not an image extension")
    for split in ("trainB", "testA", "testB"):
        _img(raw / f"{split}/1.png", colour=(200, 0, 0))
    return raw


def test_skip_reports_bad_files_and_converts(messy, tmp_path):
    out = tmp_path / "prepared"
    m = prepare_dataset(messy, out, dataset="messy", bad_images="skip")
    bad = {Path(b["path"]).name: b["reason"] for b in m["bad_files"]}
    assert set(bad) == {"truncated.jpg", "text.png", "empty.PNG"}
    assert "truncated" in bad["truncated.jpg"] and "not an image" in bad["text.png"] and "empty" in bad["empty.PNG"]
    assert m["layout"] == "unpaired" and m["counts"] == {"trainA": 6, "trainB": 1, "testA": 1, "testB": 1}
    assert sorted(p.name for p in (out / "trainA").iterdir()) == [
        "UPPER.jpg", "cmyk.png", "grey16.png", "rgb.png", "rgba.png", "sub__palette.png"]
    for rel, rec in m["files"].items():
        data = (out / rel).read_bytes()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)
        with Image.open(out / rel) as im:
            assert im.mode == "RGB" and list(im.size) == rec["size"]
    assert (out / "trainA/UPPER.jpg").read_bytes() == (messy / "trainA/UPPER.JPG").read_bytes()  # kept as is
    assert np.asarray(Image.open(out / "trainA/grey16.png"))[0, 0].tolist() == [156, 156, 156]  # 40000 / 257
    assert json.loads((out / "manifest.json").read_text()) == m


def test_stop_lists_every_bad_file_and_writes_nothing(messy, tmp_path):
    with pytest.raises(BadImagesError) as err:
        prepare_dataset(messy, tmp_path / "prepared", bad_images="stop")
    for name in ("truncated.jpg", "text.png", "empty.PNG"):
        assert str(messy / "trainA" / name) in str(err.value)
    assert not (tmp_path / "prepared").exists() and [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_empty_split_fails_even_when_skipping(messy, tmp_path):
    (messy / "testB/1.png").write_bytes(b"garbage")
    with pytest.raises(BadImagesError, match="testB"):
        prepare_dataset(messy, tmp_path / "prepared", bad_images="skip")


def test_paired_val_becomes_test_and_resize(tmp_path):
    raw = tmp_path / "raw"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # A red on the left, B blue on the right
    for split, n in (("train", 3), ("val", 2)):
        (raw / split).mkdir(parents=True)
        for i in range(n):
            img.save(raw / split / f"{i}.jpg", quality=95)
    m = prepare_dataset(raw, tmp_path / "out", resize=8)
    assert m["layout"] == "paired" and m["counts"] == {"train": 3, "test": 2}
    arr = np.asarray(Image.open(tmp_path / "out/test/0.png"))
    assert arr.shape == (8, 16, 3) and arr[4, 2, 0] > 200 and arr[4, 13, 2] > 200


def test_ab_folders_are_combined_with_fixed_split(tmp_path):
    raw = tmp_path / "raw"
    for i in range(12):
        _img(raw / f"A/{i:02d}.png", (255, 0, 0), size=(10, 10))
        _img(raw / f"B/{i:02d}.jpg", (0, 0, 255), size=(12, 12), fmt="JPEG")  # other size: B takes A's
    _img(raw / "A/lonely.png")
    assert detect_layout(raw) == "folders"
    m1 = prepare_dataset(raw, tmp_path / "out1")
    m2 = prepare_dataset(raw, tmp_path / "out2")
    assert m1["counts"] == {"train": 11, "test": 1} and m1["files"] == m2["files"]
    assert [Path(b["path"]).name for b in m1["bad_files"]] == ["lonely.png"]
    assert all(rec["size"] == [20, 10] for rec in m1["files"].values())


def test_corrupt_file_without_partner_is_corrupt_and_named_in_the_users_folder(tmp_path):
    """A/ B/ layout: a random-bytes A/ file with no B/ partner is reported as not an image (not only as
    unmatched), under the folder it came from (`origin`: the user's own, not the copy prepare reads)."""
    raw, mine = tmp_path / "data" / "raw" / "mine", tmp_path / "my_photos"
    for i in range(4):
        _img(raw / f"A/{i}.png")
        _img(raw / f"B/{i}.png", (0, 0, 255))
    (raw / "A" / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    m = prepare_dataset(raw, tmp_path / "out", origin=mine)
    (bad,) = m["bad_files"]
    assert bad["path"] == str(mine / "A" / "noise.png")
    assert bad["reason"].startswith("not an image") and "no file with the same name in B/" in bad["reason"]
    assert str(raw) not in bad["reason"]
    with pytest.raises(BadImagesError, match=f"^{mine}: 1 bad file"):
        prepare_dataset(raw, tmp_path / "out", bad_images="stop", origin=mine)


def test_unknown_layout_is_explained(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(LayoutError, match="trainA/ trainB/ testA/ testB/"):
        detect_layout(tmp_path)
    (tmp_path / "trainA").mkdir()
    with pytest.raises(LayoutError, match="without trainB/"):
        detect_layout(tmp_path)


def _png(colour, size=(32, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_cityscapes_from_fake_zips(tmp_path):
    zips = tmp_path / "manual"
    with pytest.raises(CityscapesMissingError) as err:
        build_cityscapes(zips, tmp_path / "raw")
    for text in (GTFINE_ZIP, LEFTIMG_ZIP, "https://www.cityscapes-dataset.com/downloads/", str(zips)):
        assert text in str(err.value)
    zips.mkdir()
    frames = {"train": ["aachen_000000_000019", "bochum_000000_000313"], "val": ["lindau_000001_000019"]}
    with zipfile.ZipFile(zips / GTFINE_ZIP, "w") as zl, zipfile.ZipFile(zips / LEFTIMG_ZIP, "w") as zp:
        for phase, keys in frames.items():
            for key in keys:
                city = key.split("_")[0]
                zl.writestr(f"gtFine/{phase}/{city}/{key}_gtFine_color.png", _png((128, 64, 128)))
                zl.writestr(f"gtFine/{phase}/{city}/{key}_gtFine_labelIds.png", _png((7, 7, 7)))
                zp.writestr(f"leftImg8bit/{phase}/{city}/{key}_leftImg8bit.png", _png((20, 200, 20)))
        zp.writestr("leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png", _png((0, 0, 0)))
    counts = build_cityscapes(zips, tmp_path / "raw", size=16)
    assert counts == {"train": 2, "test": 1}
    arr = np.asarray(Image.open(tmp_path / "raw/test/lindau_000001_000019.png"))
    assert arr.shape == (16, 32, 3)
    assert arr[8, 4].tolist() == [20, 200, 20] and arr[8, 20].tolist() == [128, 64, 128]  # photo A | label B
    m = prepare_dataset(tmp_path / "raw", tmp_path / "prepared")
    assert m["layout"] == "paired" and m["counts"] == {"train": 2, "test": 1}


def test_stage_prepare_end_to_end(tmp_path, monkeypatch):
    from stages.download import main as download
    from stages.prepare import main as prepare

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "datasets:\n  emb: {source: embedded, kind: edges, size: 16, n_train: 4, n_test: 2}\n"
        "  city: {source: cityscapes}\ndata: {bad_images: stop}\n")
    download(["emb"])
    prepare(["emb"])
    m = json.loads((tmp_path / "data/prepared/emb/manifest.json").read_text())
    assert m["counts"] == {"train": 4, "test": 2} and m["bad_files"] == []
    with pytest.raises(SystemExit, match="data/manual/cityscapes"):
        download(["city"])
