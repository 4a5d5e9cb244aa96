"""Hostile input, numbers and enumerations: every numeric param is range-checked when params are read,
with the key named (per-task overrides and `lam_overrides` included), so that nothing divides by zero,
loops forever or silently misbehaves hours into a run."""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from piggyback import config as C
from piggyback.config import RANGES, ConfigError, parse_params

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "params.yaml").read_text())
SECTIONS = {"BaseConfig": ("base",), "DataConfig": ("data",), "ModelConfig": ("model",), "TrainConfig": ("train",),
            "CycleGANConfig": ("train", "cyclegan"), "Pix2PixConfig": ("train", "pix2pix"), "EvalConfig": ("eval",),
            "DatasetConfig": ("datasets", "emb_edges"), "TaskConfig": ("tasks", "t2")}


def _with(path: tuple, value) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return raw


def _refused(path: tuple, value, key: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(_with(path, value))
    assert (key or ".".join(path)) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("path, value", [
    (("tasks", "t2", "epochs"), -5),
    (("train", "log_every"), 0),
    (("train", "lr"), math.nan),
    (("train", "lr"), math.inf),
    (("train", "beta1"), 5),
    (("train", "snapshot_every"), -1),
    (("train", "max_steps"), -1),
    (("data", "max_download_bytes"), -1),
    (("datasets", "emb_edges", "resize"), 0),
    (("datasets", "emb_edges", "sha256"), "abc"),
    (("datasets", "emb_edges", "sha256"), "g" * 64),
    (("model", "lam_overrides"), {"last": True}),
    (("model", "lam_overrides"), {"last": "0.5"}),
    (("model", "lam_overrides"), {"last": math.nan}),
    (("model", "ngf"), 10**9),
    (("train", "nproc"), 0),
    (("eval", "num_test"), -1),
])
def test_reported_out_of_range_values_are_refused_naming_the_key(path, value):
    key = ".".join(path) + (".last" if path[-1] == "lam_overrides" else "")
    _refused(path, value, key)


def test_a_task_with_zero_epochs_in_all_is_refused():
    raw = _with(("tasks", "t2", "epochs"), 0)
    raw["tasks"]["t2"]["epochs_decay"] = 0
    with pytest.raises(ConfigError, match=r"tasks\.t2\.epochs"):
        parse_params(raw)
    raw["tasks"]["t2"]["epochs"] = 1             # one epoch is enough
    parse_params(raw)


def _numeric_fields() -> list[tuple[str, type]]:
    out = []
    for cls_name in SECTIONS:
        cls = getattr(C, cls_name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if args[0] in (int, float):
                out.append((f"{cls_name}.{f.name}", args[0]))
    return out


def test_every_numeric_param_has_a_range():
    missing = [k for k, _ in _numeric_fields() if k not in RANGES]
    assert not missing, f"add these to config.RANGES: {missing}"


FIELDS = _numeric_fields()


@st.composite
def _out_of_range(draw):
    key, tp = draw(st.sampled_from(FIELDS))
    lo, hi, *open_ = RANGES[key]
    below = st.integers(max_value=lo - (0 if open_ else 1)) if tp is int else st.floats(max_value=lo, exclude_max=not open_)
    choices = [below]
    if hi is not None:
        choices.append(st.integers(min_value=hi + 1) if tp is int else st.floats(min_value=hi, exclude_min=True))
    if tp is float:
        choices.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    return key, draw(st.one_of(choices))


@settings(max_examples=120, deadline=None)
@given(_out_of_range())
def test_any_out_of_range_number_is_refused_naming_its_key(case):
    key, value = case
    cls_name, name = key.split(".")
    _refused(SECTIONS[cls_name] + (name,), value)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FIELDS), st.one_of(st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2)))
def test_wrong_types_are_refused_naming_the_key(field, value):
    key, _ = field
    cls_name, name = key.split(".")
    _refused(SECTIONS[cls_name] + (name,), value)


def test_unknown_lam_override_layer_is_refused_by_stage_init(tmp_path):
    import stages.init

    raw = _with(("model", "lam_overrides"), {"model.999": 0.5})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as info:
        stages.init.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "init")])
    assert "lam_overrides.model.999" in str(info.value.code) and not (tmp_path / "init").exists()


def test_stage_init_exits_naming_an_out_of_range_key(tmp_path):
    import stages.init

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_with(("train", "beta1"), 5)))
    with pytest.raises(SystemExit) as info:
        stages.init.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "init")])
    assert "train.beta1" in str(info.value.code) and not (tmp_path / "init").exists()
