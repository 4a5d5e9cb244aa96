"""Hostile input, the `piggyback` CLI: every expected failure exits 2 with one line naming the input
(decompression bombs, an unusable --output, unknown or missing devices, invalid architecture numbers),
never a traceback."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from piggyback import GeneratorConfig, LifelongModel, save_lifelong
from piggyback.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def bomb_png(path: Path, side: int = 40_000) -> Path:
    """A tiny PNG whose header claims side x side pixels: PIL refuses to decode it (decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = LifelongModel(GeneratorConfig(netG="resnet_6blocks", ngf=2))
    model.add_task("t1", "pix2pix")
    model.finish_task()
    save_lifelong(model, root / "ck")
    (root / "in").mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(root / "in" / "ok.png")
    (root / "afile").write_text("x")
    return root


def _fails(capsys, argv: list[str], *names: str) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:       # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


def _translate(setup, **over) -> list[str]:
    args = {"--checkpoint": setup / "ck", "--task": "t1", "--input": setup / "in", "--output": setup / "out"} | over
    return ["translate", *[str(x) for kv in args.items() for x in kv]]


def test_translate_works_on_good_input(setup, capsys):
    assert main(_translate(setup, **{"--output": setup / "good"}) + ["--device", "cpu"]) == 0
    assert (setup / "good" / "ok.png").is_file()


def test_a_decompression_bomb_in_the_input_folder_is_named(setup, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bomb_png(tmp_path / "in" / "bomb.png")
    _fails(capsys, _translate(setup, **{"--input": tmp_path / "in", "--output": tmp_path / "out"}), "bomb.png")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["is_file", "below_file"])
def test_output_at_or_below_a_file_is_refused(setup, capsys, where):
    out = setup / "afile" if where == "is_file" else setup / "afile" / "sub"
    _fails(capsys, _translate(setup, **{"--output": out}), "--output", str(out))


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "tpu"])
def test_unknown_or_missing_devices_are_refused(setup, capsys, device):
    _fails(capsys, _translate(setup, **{"--device": device}), f"--device {device!r}")


@pytest.mark.parametrize("argv, flag", [
    (["growth", "--ngf", "-3"], "--ngf"),
    (["growth", "--ngf", "x"], "--ngf"),
    (["growth", "--lam", "nan"], "--lam"),
    (["growth", "--lam", "1.5"], "--lam"),
    (["growth", "--tasks", "0"], "--tasks"),
    (["growth", "--input-nc", "0"], "--input-nc"),
    (["growth", "--lam-override", "last=true"], "--lam-override"),
    (["import-reference", "x.pth", "--ngf", "-3", "--out", "o"], "--ngf"),
    (["import-reference", "x.pth", "--task-name", "../../evil", "--out", "o"], "../../evil"),
])
def test_invalid_numbers_and_names_are_one_line_errors(capsys, argv, flag):
    _fails(capsys, argv, flag)


def test_import_reference_of_a_missing_file_is_one_line(tmp_path, capsys):
    _fails(capsys, ["import-reference", str(tmp_path / "missing.pth"), "--netG", "resnet_6blocks", "--ngf", "2",
                    "--out", str(tmp_path / "ck")], "missing.pth")
