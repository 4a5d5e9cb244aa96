"""params.yaml validation: unknown keys, bad values and broken task chains fail naming the key."""
from pathlib import Path

import pytest
import yaml

from piggyback.config import ConfigError, load_params, parse_params, task_recipe

ROOT = Path(__file__).resolve().parents[1]


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_valid_and_ordered():
    p = load_params(ROOT / "params.yaml")
    assert p.task_order() == list(p.tasks)  # the default suite is written in training order
    modes = {t.mode for t in p.tasks.values()}
    assert modes == {"cyclegan", "pix2pix"} and len(p.tasks) >= 3


@pytest.mark.parametrize("suite", sorted((ROOT / "suites").glob("*.yaml")), ids=lambda s: s.stem)
def test_paper_suites_are_valid(suite):
    p = load_params(suite)
    assert p.task_order()


@pytest.mark.parametrize("path, value, message", [
    (("train", "lamda"), 1, "Unknown config key: train.lamda"),
    (("train", "cyclegan", "lamda_A"), 1, "Unknown config key: train.cyclegan.lamda_A"),
    (("model", "netG"), "resnet_7blocks", "model.netG"),
    (("model", "lam"), 0.0, "model.lam"),
    (("model", "lam_overrides"), {"last": 2.0}, "model.lam_overrides.last"),
    (("train", "batch_size"), "4", "train.batch_size: expected int"),
    (("data", "crop_size"), 512, "data.load_size"),
    (("tasks", "t2", "prev"), "t9", "tasks.t2.prev"),
    (("tasks", "t2", "dataset"), "nope", "tasks.t2.dataset"),
    (("tasks", "t2", "mode"), "cycle", "tasks.t2.mode"),
])
def test_bad_values_name_the_key(path, value, message):
    raw = _raw()
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_params(raw)


def test_unknown_section_and_missing_file(tmp_path):
    raw = _raw()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="Unknown config key: trian"):
        parse_params(raw)
    with pytest.raises(ConfigError, match="nothing.yaml: no such params file"):
        load_params(tmp_path / "nothing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(bad)


def test_task_chain_rejects_forks_and_bad_ids():
    raw = _raw()
    raw["tasks"]["t4"] = {"dataset": raw["tasks"]["t1"]["dataset"], "prev": "t1"}
    with pytest.raises(ConfigError, match="several successors"):
        parse_params(raw)
    raw = _raw()
    raw["tasks"]["a.b"] = {"dataset": raw["tasks"]["t1"]["dataset"], "prev": "t3"}
    with pytest.raises(ConfigError, match="task ids"):
        parse_params(raw)


def test_task_recipe_applies_overrides():
    raw = _raw()
    raw["tasks"]["t2"].update(epochs=7, lam=0.5, direction="BtoA")
    p = parse_params(raw)
    r = task_recipe(p, "t2")
    assert (r.epochs, r.epochs_decay, r.lam, r.direction) == (7, p.train.epochs_decay, 0.5, "BtoA")
    assert task_recipe(p, "t1").lam == p.model.lam
    with pytest.raises(ConfigError, match="tasks.t9"):
        task_recipe(p, "t9")


@pytest.mark.parametrize("params", [ROOT / "params.yaml", *sorted((ROOT / "suites").glob("*.yaml"))], ids=lambda s: s.stem)
def test_every_lam_override_is_settable_with_dvc_set_param(params, tmp_path):
    """`dvc exp run -S model.lam_overrides.<group>=<value>` needs the key in the file (Hydra refuses new keys
    without '+'): every layer group is there, null means model.lam, and the default is the output layer at 1.0."""
    from dvc.utils.hydra import apply_overrides

    from piggyback.config import LAYER_GROUPS

    assert list(yaml.safe_load(params.read_text())["model"]["lam_overrides"]) == list(LAYER_GROUPS)
    assert load_params(params).model.lam_overrides == {"last": 1.0}
    copy = tmp_path / "params.yaml"
    copy.write_text(params.read_text())
    apply_overrides(str(copy), ["model.lam_overrides.last=null", "model.lam_overrides.blocks=0.5",
                                "+model.lam_overrides.model.4=0.75"])
    assert load_params(copy).model.lam_overrides == {"blocks": 0.5, "model.4": 0.75}  # dotted name re-joined
