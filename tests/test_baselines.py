"""Baselines through the same stages: `separate` (a full generator per task) and `finetune` (one generator
re-trained task after task), beside `piggyback`, on a tiny embedded suite, and the report's side-by-side table.

Each method runs init -> train x3 -> evaluate x3 -> audit -> matrix -> report in this process with one shared
MLflow store, as `dvc exp run -S train.method=...` would.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from piggyback.accounting import growth_table
from piggyback.checkpoint import load_lifelong, load_probes
from piggyback.probes import check_probes
from stages import audit as audit_stage
from stages import evaluate as evaluate_stage
from stages import matrix as matrix_stage
from stages import report as report_stage
from train_helpers import make_data, run_init, run_train, single_thread, write_params  # noqa: F401

TASKS = {
    "t1": {"dataset": "edges", "prev": "init", "mode": "pix2pix"},
    "t2": {"dataset": "daynight", "prev": "t1", "mode": "cyclegan"},
    "t3": {"dataset": "facades", "prev": "t2", "mode": "pix2pix"},
}
METHODS = ("piggyback", "separate", "finetune")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """method -> its workspace (params.yaml, models/, metrics/), all logging to one MLflow store."""
    root = tmp_path_factory.mktemp("baselines")
    data = make_data(root, ["edges", "daynight", "facades"])
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(root / "torch_home"))            # no FID weights: FID unavailable, offline
    mp.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for method in METHODS:
            ws = root / method
            ws.mkdir()
            params = write_params(ws / "params.yaml", TASKS, train={"method": method, "max_steps": 4, "epochs": 2},
                                  mlflow={"enabled": True, "tracking_uri": f"sqlite:///{root}/mlflow.db"})
            common = ["--params", str(params), "--models", str(ws / "models"), "--metrics", str(ws / "metrics")]
            run_init(params, ws / "models")
            for t in TASKS:
                run_train(t, params, ws / "models", data, ws / "metrics")
                evaluate_stage.main([t, *common, "--data", str(data), "--out", str(ws / "translated"),
                                     "--fid-cache", str(root / "fid_cache")])
            audit_stage.main([*common, "--data", str(data)])
            matrix_stage.main([*common, "--data", str(data)])
            report_stage.main(common)
            out[method] = ws
    finally:
        torch.set_num_threads(n)
        mp.undo()
    return out


def _full(netG="resnet_6blocks", ngf=4) -> int:
    return growth_table(netG, ngf, 1, 1.0)[0]["full_params"]


def test_separate_stores_a_full_generator_per_task(runs):
    model = load_lifelong(runs["separate"] / "models" / "t3")
    full = _full()
    # t1: G_A; t2 (CycleGAN): G_A and G_B; t3: G_A -> four full generators in all.
    assert [r["stored_params"] for r in model.tasks] == [full, 3 * full, 4 * full]
    assert all(r["new_params"] == r["separate_params"] - (0 if i == 0 else model.tasks[i - 1]["separate_params"])
               for i, r in enumerate(model.tasks))
    assert model.tasks[-1]["stored_params"] == model.tasks[-1]["separate_params"]
    assert check_probes(model, load_probes(runs["separate"] / "models" / "t3")) == \
        {"t1": {"G_A": True}, "t2": {"G_A": True, "G_B": True}, "t3": {"G_A": True}}


def test_finetune_stores_one_generator_and_forgets(runs):
    ws = runs["finetune"]
    model = load_lifelong(ws / "models" / "t3")
    full = _full()
    assert [r["stored_params"] for r in model.tasks] == [full, 2 * full, 2 * full]   # G_A (+ G_B from t2 on)
    checks = check_probes(model, load_probes(ws / "models" / "t3"))
    assert checks["t1"] == {"G_A": False} and checks["t3"] == {"G_A": True}      # t1's probe no longer matches
    assert model.task("t1")["overwritten_by"] == {"G_A": "t3"}
    forgetting = json.loads((ws / "metrics" / "info" / "forgetting.json").read_text())  # the audit passed, recording drift
    t1 = forgetting["tasks"]["t1"]
    assert t1["exact"] is False and t1["max_abs_diff"] > 0
    assert t1["generators"]["G_A"]["overwritten_by"] == "t3"
    after = json.loads((ws / "metrics" / "tasks" / "t1.json").read_text())["l1"]
    assert t1["l1_after_training"] == after and t1["final_l1"] != after
    assert t1["forgetting_l1"] == pytest.approx(t1["final_l1"] - after)


def test_piggyback_matches_every_probe_and_the_accounting(runs):
    model = load_lifelong(runs["piggyback"] / "models" / "t3")
    assert all(all(v.values()) for v in check_probes(model, load_probes(runs["piggyback"] / "models" / "t3")).values())
    g_a = growth_table("resnet_6blocks", 4, 3, 0.25)          # G_A learns t1, t2, t3; G_B only t2
    g_b = growth_table("resnet_6blocks", 4, 1, 0.25)
    assert [r["stored_params"] for r in model.tasks] == \
        [g_a[0]["stored_params"], g_a[1]["stored_params"] + g_b[0]["stored_params"],
         g_a[2]["stored_params"] + g_b[0]["stored_params"]]
    forgetting = json.loads((runs["piggyback"] / "metrics" / "info" / "forgetting.json").read_text())
    assert forgetting["all_exact"] is True


def test_report_puts_the_methods_side_by_side(runs):
    ws = runs["finetune"]                                       # reported last: sees the two earlier methods
    summary = json.loads((ws / "metrics" / "summary.json").read_text())
    comparison = summary["comparison"]
    assert comparison["methods"] == list(METHODS)
    assert set(comparison["runs"]) == set(METHODS)
    by_name = {t["name"]: t for t in comparison["tasks"]}
    for method in METHODS:                                       # stored params as each checkpoint recorded
        records = {r["name"]: r for r in load_lifelong(runs[method] / "models" / "t3").tasks}
        for name, t in by_name.items():
            assert t[method]["stored_params"] == {"mean": records[name]["stored_params"], "std": None, "n": 1}
            assert t[method]["l1"]["n"] == 1
    assert by_name["t1"]["piggyback"]["forgetting_l1"]["mean"] == 0.0
    assert by_name["t1"]["finetune"]["forgetting_l1"]["mean"] != 0.0
    assert by_name["t3"]["finetune"]["forgetting_l1"]["mean"] == 0.0     # the last task is not forgotten yet
    assert comparison["matrix"]["piggyback"]["bwt_l1"]["mean"] == 0.0
    assert comparison["matrix"]["finetune"]["bwt_l1"]["mean"] != 0.0
    md = (ws / "metrics" / "summary.md").read_text()
    assert "## Methods side by side" in md and all(md.count(f"| t1 | {m} | 1 | ") == 1 for m in METHODS)
    assert {"name", "l1", "psnr", "ssim", "fid", "kid", "stored_params", "separate_params",
            "forgetting_max_abs_diff"} <= set(summary["tasks"][0])        # per-task rows stay beside the aggregates
    assert summary["matrix"]["method"] == "finetune"
    assert (ws / "metrics" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # The first method, reported alone, has no side-by-side section.
    assert "Methods side by side" not in (runs["piggyback"] / "metrics" / "summary.md").read_text()


def _matrix(ws: Path) -> dict:
    return json.loads((ws / "metrics" / "info" / "matrix.json").read_text())


@pytest.mark.parametrize("method", ["piggyback", "separate"])
def test_matrix_columns_are_constant_when_nothing_is_forgotten(runs, method):
    m = _matrix(runs[method])
    assert m["tasks"] == list(TASKS) and m["method"] == method
    for metric, r in m["metrics"].items():
        for j in range(3):
            assert r[j][j] is not None and all(r[i][j] == r[j][j] for i in range(j, 3)), (metric, j)
            assert all(r[i][j] is None for i in range(j))                 # task j is not learned before i = j
        assert m["summary"][metric]["bwt"] == 0.0
    # bit-identical earlier tasks reuse their scores; the diagonal is the evaluate stage's own number
    assert m["evaluated"] == 0 and m["reused"] == 6
    for j, t in enumerate(TASKS):
        assert m["metrics"]["l1"][j][j] == json.loads((runs[method] / "metrics" / "tasks" / f"{t}.json").read_text())["l1"]
    assert (runs[method] / "metrics" / "matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_matrix_of_finetuning_changes_down_every_earlier_column(runs):
    m = _matrix(runs["finetune"])
    r = m["metrics"]["l1"]
    assert r[1][0] != r[0][0] and r[2][0] != r[1][0] and r[2][1] != r[1][1]
    assert m["evaluated"] == 3                                            # t1 @ t2, t1 @ t3, t2 @ t3
    assert m["summary"]["l1"]["bwt"] == pytest.approx(((r[2][0] - r[0][0]) + (r[2][1] - r[1][1])) / 2)
    assert m["summary"]["l1"]["final_mean"] == pytest.approx(sum(r[2]) / 3)
    forgetting = json.loads((runs["finetune"] / "metrics" / "info" / "forgetting.json").read_text())
    assert r[2][0] == pytest.approx(forgetting["tasks"]["t1"]["final_l1"], abs=1e-6)   # the audit's rescoring
