"""Start a lifelong run from a pretrained junyanz CycleGAN: import-reference -> model.init_from -> init,
train, audit, report. The imported task stays exact while new tasks are learned on top of it."""
from __future__ import annotations

import json

import pytest
import torch

from piggyback import cli
from piggyback.checkpoint import load_lifelong, load_probes
from piggyback.probes import check_probes
from stages import audit as audit_stage
from stages import init as init_stage
from stages import report as report_stage
from test_reference import RefResnetGenerator, _randomise
from train_helpers import make_data, run_train, single_thread, write_params  # noqa: F401

TASKS = {"t1": {"dataset": "edges", "prev": "init", "mode": "pix2pix"}}


@pytest.fixture
def imported(tmp_path, monkeypatch):
    """tmp_path/pretrained/h2z: a CycleGAN pair (resnet_6blocks, ngf 4) imported as a lifelong checkpoint."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    for side, seed in (("A", 3), ("B", 4)):
        torch.save(_randomise(RefResnetGenerator(4, 6), seed).state_dict(), tmp_path / f"latest_net_G_{side}.pth")
    assert cli.main(["import-reference", "latest_net_G_A.pth", "--path-B", "latest_net_G_B.pth", "--netG",
                     "resnet_6blocks", "--ngf", "4", "--task-name", "h2z", "--out", "pretrained/h2z"]) == 0
    return tmp_path


def test_chain_starts_from_the_imported_checkpoint(imported):
    tmp = imported
    data = make_data(tmp, ["edges"])
    params = write_params(tmp / "params.yaml", TASKS, model={"init_from": "pretrained/h2z"}, train={"max_steps": 3})
    models, metrics = tmp / "models", tmp / "metrics"
    init_stage.main(["--params", str(params), "--out", str(models / "init")])
    assert load_lifelong(models / "init").task_names() == ["h2z"]
    run_train("t1", params, models, data, metrics)

    final = load_lifelong(models / "t1")
    assert final.task_names() == ["h2z", "t1"]
    probes = load_probes(models / "t1")
    assert check_probes(final, probes) == {"h2z": {"G_A": True, "G_B": True}, "t1": {"G_A": True}}
    assert probes["h2z"]["G_A"]["input"].shape == (2, 3, 64, 64)

    audit_stage.main(["--params", str(params), "--models", str(models), "--metrics", str(metrics),
                      "--data", str(data)])
    assert json.loads((metrics / "info" / "forgetting.json").read_text())["all_exact"] is True
    report_stage.main(["--params", str(params), "--models", str(models), "--metrics", str(metrics)])
    rows = json.loads((metrics / "summary.json").read_text())["tasks"]
    assert [(r["name"], r["imported"]) for r in rows] == [("h2z", True), ("t1", False)]
    assert rows[0]["fid"] is None and "imported" in rows[0]["fid_reason"]
    assert rows[1]["stored_params"] == final.tasks[1]["stored_params"] > rows[0]["stored_params"]


@pytest.mark.parametrize("model, expected", [
    ({"init_from": "pretrained/missing"}, "not a lifelong checkpoint folder"),
    ({"init_from": "pretrained/h2z", "ngf": 8}, "model.ngf"),
])
def test_bad_init_from_is_named_before_any_work(imported, model, expected):
    params = write_params(imported / "params.yaml", TASKS, model=model)
    with pytest.raises(SystemExit) as exc:
        init_stage.main(["--params", str(params), "--out", str(imported / "models" / "init")])
    assert expected in str(exc.value.code) and not (imported / "models" / "init").exists()


def test_task_name_clash_is_refused(imported):
    params = write_params(imported / "params.yaml", {"h2z": {"dataset": "edges", "prev": "init", "mode": "pix2pix"}},
                          model={"init_from": "pretrained/h2z"})
    with pytest.raises(SystemExit) as exc:
        init_stage.main(["--params", str(params), "--out", str(imported / "models" / "init")])
    assert "tasks.h2z" in str(exc.value.code)
