"""Stage audit and `piggyback translate`: the final checkpoint reproduces every task; users translate folders.

The chain (3 tasks, tiny resnet_6blocks, probes recorded as training does) comes from test_evaluation.
Tampering is done the way a bug would do it: one value of a stored bank tensor changes and the
checkpoint is written again with fresh file hashes, so only the probes can tell.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from piggyback import load_lifelong, save_lifelong
from piggyback.checkpoint import GENERATORS, load_probes
from piggyback.cli import main as cli
from piggyback.translate import translate_folder
from stages import audit as audit_stage
from test_evaluation import SIZE, make_chain, make_data, write_params


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    make_chain(root / "models", make_data(root))
    return root


def _workspace(chain: Path, tmp_path: Path) -> Path:
    """A writable copy of models/ and params.yaml beside the shared prepared data."""
    shutil.copytree(chain / "models", tmp_path / "models")
    write_params(tmp_path / "params.yaml")
    return tmp_path


def _run_audit(ws: Path, chain: Path) -> None:
    audit_stage.main(["--params", str(ws / "params.yaml"), "--models", str(ws / "models"),
                      "--metrics", str(ws / "metrics"), "--data", str(chain / "prepared")])


def _tamper_bank(ws: Path, layer: str = "model.1", slot_row: int = 0) -> None:
    """Change one value of task 1's filters in G_A's bank of the final checkpoint (t3); save it again."""
    final = ws / "models" / "t3"
    model, probes = load_lifelong(final), load_probes(final)
    bank = dict(model.generators["G_A"].named_buffers())[f"{layer}.filter_bank"]
    with torch.no_grad():
        bank.view(bank.shape[0], -1)[slot_row, 0] += 0.5
    shutil.rmtree(final)
    save_lifelong(model, final, probes=probes)


def test_clean_chain_is_exact(chain, tmp_path, capsys):
    ws = _workspace(chain, tmp_path)
    _run_audit(ws, chain)
    report = json.loads((ws / "metrics" / "info" / "forgetting.json").read_text())
    assert report["all_exact"] is True and report["method"] == "piggyback"
    assert list(report["tasks"]) == ["t1", "t2", "t3"]
    for name, row in report["tasks"].items():
        assert row["exact"] is True and row["max_abs_diff"] == 0.0, name
    assert set(report["tasks"]["t2"]["generators"]) == {"G_A", "G_B"}   # CycleGAN: both directions checked
    assert "t1 exact" in capsys.readouterr().out


def test_one_changed_bank_value_fails_naming_task_and_layer(chain, tmp_path):
    ws = _workspace(chain, tmp_path)
    _tamper_bank(ws)
    with pytest.raises(SystemExit) as exc:
        _run_audit(ws, chain)
    msg = str(exc.value.code)
    assert "task 't1' was altered" in msg and "G_A.model.1" in msg, msg
    report = json.loads((ws / "metrics" / "info" / "forgetting.json").read_text())   # written before failing
    t1 = report["tasks"]["t1"]
    assert t1["exact"] is False and t1["max_abs_diff"] > 0
    assert t1["generators"]["G_A"]["altered_layer"] == "G_A.model.1"
    assert t1["generators"]["G_A"]["tensor_hash_matches_record"] is False
    assert report["all_exact"] is False


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_file_is_named(chain, tmp_path):
    ws = _workspace(chain, tmp_path)
    path = ws / "models" / "t3" / GENERATORS
    _flip_middle_byte(path)
    with pytest.raises(SystemExit) as exc:
        _run_audit(ws, chain)
    assert "cannot be trusted" in str(exc.value.code) and GENERATORS in str(exc.value.code)


def test_damaged_intermediate_checkpoint_fails_with_the_final_intact(chain, tmp_path):
    """Every task's own checkpoint is verified, not only the final one."""
    ws = _workspace(chain, tmp_path)
    path = ws / "models" / "t1" / GENERATORS
    _flip_middle_byte(path)
    with pytest.raises(SystemExit) as exc:
        _run_audit(ws, chain)
    msg = str(exc.value.code)
    assert "task t1 cannot be trusted" in msg and str(path) in msg and "dvc checkout train@t1" in msg


def test_stale_snapshot_of_a_finished_task_is_removed(chain, tmp_path, capsys):
    """A snapshot folder beside a finished task (DVC restored the task from its run cache) is deleted."""
    ws = _workspace(chain, tmp_path)
    stale = ws / "models" / ".snapshots" / "t2"
    stale.mkdir(parents=True)
    (stale / "snapshot.pt").write_bytes(b"old")
    _run_audit(ws, chain)
    assert not (ws / "models" / ".snapshots").exists()
    assert "stale snapshot folders of finished task(s) t2" in capsys.readouterr().out
    report = json.loads((ws / "metrics" / "forgetting.json").read_text())
    listed = sum(len(json.loads((ws / "models" / t / "meta.json").read_text())["files"]) for t in ("t1", "t2", "t3"))
    assert report["checkpoint_files_verified"] == listed >= 3


def test_missing_final_checkpoint_names_the_stage(chain, tmp_path):
    ws = _workspace(chain, tmp_path)
    shutil.rmtree(ws / "models" / "t3")
    with pytest.raises(SystemExit) as exc:
        _run_audit(ws, chain)
    assert "dvc repro train@t3" in str(exc.value.code)


# ---------------------------------------------------------------------------------------------
# piggyback translate

def _user_folder(path: Path) -> dict[str, np.ndarray]:
    """PNG and JPEG inputs, upper-case extensions and a grayscale image included: name -> RGB pixels."""
    rng = np.random.default_rng(0)
    path.mkdir()
    pixels = {}
    for name in ("a.png", "b.JPG", "c.jpeg", "D.PNG", "e.Jpg"):
        arr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path / name)
        with Image.open(path / name) as im:
            pixels[name] = np.array(im.convert("RGB"))
    Image.fromarray(pixels["a.png"][..., 0]).save(path / "gray.png")
    pixels["gray.png"] = np.repeat(pixels["a.png"][..., :1], 3, axis=2)
    (path / "notes.txt").write_text("not an image")
    return pixels


def test_translate_writes_one_png_per_input_with_the_task_outputs(chain, tmp_path):
    pixels = _user_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert cli(["translate", "--checkpoint", str(chain / "models" / "t3"), "--task", "t1",
                "--input", str(tmp_path / "in"), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["D.png", "a.png", "b.png", "c.png", "e.png", "gray.png"]
    net = load_lifelong(chain / "models" / "t1").materialize("t1", "G_A")   # task 1 from its own checkpoint
    for name, arr in pixels.items():
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            want = ((net(x)[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        with Image.open(out / f"{Path(name).stem}.png") as im:
            got = np.array(im)
        assert got.shape == (SIZE, SIZE, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name


def test_translate_reverse_direction_of_a_cyclegan_task(chain, tmp_path):
    _user_folder(tmp_path / "in")
    written = translate_folder(chain / "models" / "t3", "t2", tmp_path / "in", tmp_path / "out", which="G_B")
    assert len(written) == 6
    forward = translate_folder(chain / "models" / "t3", "t2", tmp_path / "in", tmp_path / "fwd")
    assert any(not np.array_equal(np.array(Image.open(a)), np.array(Image.open(b))) for a, b in zip(written, forward))


@pytest.mark.parametrize("case, expected", [
    ("bad_size", "multiples of 4"),
    ("unknown_task", "t9"),
    ("no_images", "no images"),
    ("same_folder", "must differ"),
])
def test_translate_errors_are_clear_and_write_nothing(chain, tmp_path, capsys, case, expected):
    inp, out, task = tmp_path / "in", tmp_path / "out", "t1"
    inp.mkdir()
    if case == "bad_size":
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(inp / "odd.png")
    elif case == "no_images":
        (inp / "readme.txt").write_text("x")
    else:
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(inp / "ok.png")
    if case == "unknown_task":
        task = "t9"
    if case == "same_folder":
        out = inp
    code = cli(["translate", "--checkpoint", str(chain / "models" / "t3"), "--task", task,
                "--input", str(inp), "--output", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and expected in err, err
    if case == "bad_size":
        assert "odd.png (30x30)" in err
    if case != "same_folder":
        assert not out.exists() or not any(out.iterdir())
