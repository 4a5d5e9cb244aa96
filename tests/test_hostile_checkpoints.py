"""Hostile input, checkpoints and snapshots: a meta.json whose hash an attacker recomputed is still checked
field by field (CheckpointError naming the file and field, before any network is built); a damaged
training snapshot raises SnapshotError naming the file to delete."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piggyback import CheckpointError, GeneratorConfig, LifelongModel, load_lifelong, save_lifelong
from piggyback import snapshot
from piggyback.checkpoint import meta_digest
from piggyback.snapshot import SnapshotError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = LifelongModel(GeneratorConfig(netG="resnet_6blocks", ngf=2))
    model.add_task("t1", "pix2pix")
    model.finish_task()
    return save_lifelong(model, tmp_path_factory.mktemp("ck") / "t1")


def _tampered(ckpt, tmp_path, edit) -> "Path":  # noqa: F821
    out = tmp_path / "ck"
    out.mkdir(exist_ok=True)
    for f in ckpt.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    meta = json.loads((ckpt / "meta.json").read_text())
    edit(meta)
    meta["meta_sha256"] = meta_digest(meta)             # the attacker recomputes the hash
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def _set(path, value):
    def edit(meta):
        node = meta
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("path, value, field", [
    (("banks",), [1, 2], "banks"),
    (("config", "ngf"), -4, "config.ngf"),
    (("tasks",), None, "tasks"),
    (("config", "netG"), ["x"], "config.netG"),
    (("config", "lam"), True, "config.lam"),
    (("config", "lam_overrides"), {"last": 7}, "config.lam_overrides.last"),
    (("config", "input_nc"), 10**6, "config.input_nc"),
    (("method",), "magic", "method"),
    (("tasks", 0, "index", "G_A"), 5, "tasks[0].index.G_A"),
    (("tasks", 0, "mode"), ["pix2pix"], "tasks[0].mode"),
    (("tasks", 0, "hashes"), None, "tasks[0].hashes"),
    (("files", "generators.pt"), 3, "files.generators.pt"),
    (("extra",), [], "extra"),
])
def test_tampered_meta_fields_are_checkpoint_errors_naming_the_field(ckpt, tmp_path, path, value, field):
    out = _tampered(ckpt, tmp_path, _set(path, value))
    with pytest.raises(CheckpointError) as info:
        load_lifelong(out)
    assert str(out / "meta.json") in str(info.value) and f"field {field}" in str(info.value)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                     max_leaves=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["config", "method", "banks", "tasks", "files", "extra"]), value=_JSON)
def test_any_json_in_a_meta_field_gives_a_checkpoint_error_or_loads(ckpt, tmp_path_factory, key, value):
    out = _tampered(ckpt, tmp_path_factory.mktemp("t"), _set((key,), value))
    try:
        load_lifelong(out)
    except CheckpointError as e:                   # any other exception fails the test
        assert str(out) in str(e)


def test_non_finite_numbers_in_meta_are_refused(ckpt, tmp_path):
    out = _tampered(ckpt, tmp_path, lambda meta: None)
    text = (out / "meta.json").read_text()
    (out / "meta.json").write_text(text.replace('"format_version": 1', '"format_version": 1, "x": Infinity'))
    with pytest.raises(CheckpointError, match="Infinity is not a JSON number"):
        load_lifelong(out)


def _snap(tmp_path):
    state = {"task": "t1", "fingerprint": "f", "world_size": 1, "run_id": None, "epoch": 0, "done": 1, "step": 1,
             "history": [], "timer": {}, "nets": {"G_A": {"w": torch.zeros(2)}}, "optimizers": {}, "schedulers": {},
             "scaler": {}, "ranks": [{"rng": {}, "pools": {}, "sums": {}}]}
    return snapshot.save(tmp_path, state)


def test_a_good_snapshot_loads(tmp_path):
    _snap(tmp_path)
    assert snapshot.load(tmp_path)["step"] == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_dict", "missing_field", "bad_type"])
def test_a_damaged_snapshot_names_the_file_to_delete(tmp_path, damage):
    path = _snap(tmp_path)
    blob = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_a_dict":
        torch.save([1, 2], path)
    else:
        state = torch.load(path, weights_only=True)
        if damage == "missing_field":
            del state["ranks"]
        else:
            state["epoch"] = "zero"
        torch.save(state, path)
    with pytest.raises(SnapshotError, match=f"delete {path}"):
        snapshot.load(tmp_path)
    assert path.exists()                             # never deleted behind the user's back
