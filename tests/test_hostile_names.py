"""Hostile input, names: dataset keys, task ids and imported task names that would become paths or shell
words are refused by one rule (`config.check_name`), when params are read, by the stages before any
path is built, and when a checkpoint is written or loaded."""
from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from piggyback.config import NAME_RULE, ConfigError, check_name, parse_params
from piggyback.reference import import_reference_model

SAFE = string.ascii_letters + string.digits + "_-."
HOSTILE = ["../../victim", "/tmp/abs", "", ".", "..", "-rf", ".hidden", "a/b", "a b", "t1;rm -rf ~", "$(id)",
           "x" * 65, "caf\u00e9", "a\nb", "a\x00b"]


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=0, max_size=70))
def test_check_name_accepts_exactly_the_safe_alphabet(name):
    safe = 1 <= len(name) <= 64 and all(c in SAFE for c in name) and name[0] not in ".-"
    if safe:
        assert check_name("dataset key", name) == name
    else:
        with pytest.raises(ConfigError, match="dataset key") as info:
            check_name("dataset key", name)
        assert NAME_RULE in str(info.value)


def _params(datasets: dict, tasks: dict) -> dict:
    return {"datasets": datasets, "tasks": tasks}


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_dataset_keys_are_refused_at_load(key):
    raw = _params({key: {"source": "embedded", "kind": "edges"}},
                  {"t1": {"dataset": key, "prev": "init"}})
    with pytest.raises(ConfigError, match="datasets key"):
        parse_params(raw)


@pytest.mark.parametrize("tid", HOSTILE + ["init", "t.1"])
def test_hostile_task_ids_are_refused_at_load(tid):
    raw = _params({"d": {"source": "embedded", "kind": "edges"}}, {tid: {"dataset": "d", "prev": "init"}})
    with pytest.raises(ConfigError, match="tasks key"):
        parse_params(raw)


def test_non_string_keys_are_refused():
    raw = _params({1: {"source": "embedded", "kind": "edges"}}, {})
    with pytest.raises(ConfigError, match="datasets key 1"):
        parse_params(raw)


def _stage(module, tmp_path, key: str) -> str:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {key: {"source": "embedded", "kind": "edges", "size": 16,
                                                         "n_train": 1, "n_test": 1}}}))
    with pytest.raises(SystemExit) as info:
        module.main([key, "--params", str(params), "--raw-root", str(tmp_path / "raw")])
    return str(info.value.code)


@pytest.mark.parametrize("which", ["download", "prepare"])
@pytest.mark.parametrize("kind", ["absolute", "relative", "empty", "dotdot"])
def test_stages_refuse_a_bad_key_and_touch_nothing(tmp_path, which, kind):
    import stages.download
    import stages.prepare

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (tmp_path / "raw" / "other").mkdir(parents=True)
    key = {"absolute": str(victim), "relative": "../victim", "empty": "", "dotdot": ".."}[kind]
    message = _stage(stages.download if which == "download" else stages.prepare, tmp_path, key)
    assert f"dataset key {key!r}" in message
    assert (victim / "precious.txt").read_text() == "keep me" and sorted(victim.iterdir()) == [victim / "precious.txt"]
    assert (tmp_path / "raw" / "other").is_dir()


def test_fetch_dataset_refuses_a_bad_key_itself(tmp_path):
    from piggyback.config import DataConfig, DatasetConfig
    from piggyback.data.download import fetch_dataset

    with pytest.raises(ConfigError, match="datasets key"):
        fetch_dataset(str(tmp_path), DatasetConfig(source="embedded", kind="edges"), DataConfig(),
                      raw_root=tmp_path / "raw")
    assert list(tmp_path.iterdir()) == []


def test_imported_task_name_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"task name '\.\./\.\./evil'"):
        import_reference_model({"G_A": {}}, netG="resnet_6blocks", ngf=4, name="../../evil")


def test_checkpoint_with_a_hostile_task_name_is_refused_on_write_and_load(tmp_path):
    import json

    from piggyback import CheckpointError, GeneratorConfig, LifelongModel, load_lifelong, save_lifelong
    from piggyback.checkpoint import meta_digest

    model = LifelongModel(GeneratorConfig(netG="resnet_6blocks", ngf=2))
    model.add_task("../evil", "pix2pix")
    model.finish_task()
    with pytest.raises(CheckpointError, match=r"tasks\[0\]\.name"):
        save_lifelong(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    model.tasks[0]["name"] = "good"
    save_lifelong(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    meta["tasks"][0]["name"] = "/etc/evil"
    meta["meta_sha256"] = meta_digest(meta)     # an attacker recomputes the hash
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta\.json: field tasks\[0\]\.name"):
        load_lifelong(tmp_path / "ck")
