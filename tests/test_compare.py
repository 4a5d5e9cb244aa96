"""Methods side by side over seeds: the report aggregates the finished pipeline runs of its own suite.

Pipeline runs are logged to a throw-away MLflow store through the report's own `log_pipeline_run`, then
`compare_methods` must group them by suite signature + method, keep one run per seed (the newest), leave
out unfinished runs and runs of other suites, and give mean / sample std / n per task.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from piggyback.compare import comparison_markdown, compare_methods, stats
from piggyback.config import load_params
from piggyback.report import log_pipeline_run, suite_signature, to_markdown
from train_helpers import write_params

TASKS = {"t1": {"dataset": "edges", "prev": "init", "mode": "pix2pix"},
         "t2": {"dataset": "daynight", "prev": "t1", "mode": "cyclegan"}}


def _params(tmp: Path, uri: str, method: str, seed: int, epochs: int = 1):
    path = tmp / f"params_{method}_{seed}_{epochs}.yaml"
    return load_params(write_params(path, TASKS, seed=seed, train={"method": method, "epochs": epochs},
                                    mlflow={"enabled": True, "tracking_uri": uri}))


def _summary(params, l1: float, bwt: float | None = None) -> dict:
    rows = [{"name": t, "dataset": TASKS[t]["dataset"], "mode": TASKS[t]["mode"], "direction": "AtoB",
             "l1": l1 * (i + 1), "psnr": 20.0, "ssim": 0.5, "fid": None, "kid": None, "final_l1": l1 * (i + 1),
             "forgetting_l1": 0.0, "new_params": 1000, "stored_params": 1000 * (i + 1), "separate_params": 2000 * (i + 1),
             "stored_vs_separate": 0.5,
             "forgetting_max_abs_diff": 0.0, "mlflow_run_id": None} for i, t in enumerate(TASKS)]
    summary = {"method": params.train.method, "suite": suite_signature(params), "netG": "resnet_6blocks",
               "ngf": 4, "lam": 0.25, "tasks": rows}
    if bwt is not None:
        summary["matrix"] = {"summary": {"l1": {"final_mean": l1, "bwt": bwt}}}
    return summary


def _log(params, summary: dict, status: str = "FINISHED") -> str:
    if status == "FINISHED":
        return log_pipeline_run(summary, params, [])
    from piggyback import tracking

    tracker = tracking.open_run(params.mlflow, 0, "pipeline:failed", tags={
        "kind": "pipeline", "method": summary["method"], "suite": summary["suite"]})
    tracker.log_params({"base.seed": params.base.seed})
    tracker.log_metrics({"l1/t1": 5.0})
    tracker.end(status)
    return tracker.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding: piggyback seeds 0, 1 (seed 0 twice: an older run that must not count), separate
    seeds 0, 1, 2; a piggyback run of another suite (train.epochs 2) and a FAILED piggyback run."""
    import mlflow

    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("piggyback-gan", artifact_location=(tmp / "artifacts").as_uri())
    mp = pytest.MonkeyPatch()
    mp.setattr("piggyback.publish.publish_model", lambda *a, **k: None)   # no checkpoint behind these summaries
    _log(_params(tmp, uri, "piggyback", 0), _summary(_params(tmp, uri, "piggyback", 0), 0.90))    # older seed-0 run
    for seed, l1 in ((0, 0.10), (1, 0.12)):
        _log(_params(tmp, uri, "piggyback", seed), _summary(_params(tmp, uri, "piggyback", seed), l1, bwt=0.0))
    for seed, l1 in ((0, 0.08), (1, 0.09), (2, 0.13)):
        _log(_params(tmp, uri, "separate", seed), _summary(_params(tmp, uri, "separate", seed), l1, bwt=0.0))
    other = _params(tmp, uri, "piggyback", 2, epochs=2)
    _log(other, _summary(other, 7.0))
    _log(_params(tmp, uri, "piggyback", 2), _summary(_params(tmp, uri, "piggyback", 2), 3.0), status="FAILED")
    mp.undo()
    return tmp, uri


def test_suite_signature_ignores_only_method_and_seed(tmp_path):
    uri = "sqlite:///unused.db"
    base = suite_signature(_params(tmp_path, uri, "piggyback", 0))
    assert suite_signature(_params(tmp_path, uri, "separate", 3)) == base
    assert suite_signature(_params(tmp_path, uri, "piggyback", 0, epochs=2)) != base


def test_stats_mean_sample_std_and_n():
    assert stats([1.0, 2.0, None, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert stats([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    assert stats([None]) == {"mean": None, "std": None, "n": 0}


def test_aggregates_by_suite_and_method_over_seeds(store):
    tmp, uri = store
    params = _params(tmp, uri, "piggyback", 2)                     # this run: piggyback seed 2, not logged yet
    c = compare_methods(_summary(params, 0.14, bwt=0.0), params)
    assert c["methods"] == ["piggyback", "separate"]
    assert c["seeds"] == {"piggyback": ["0", "1", "2"], "separate": ["0", "1", "2"]}
    assert len(c["runs"]["piggyback"]) == 3 and "this run" in c["runs"]["piggyback"]
    t1, t2 = c["tasks"]
    # piggyback t1: seeds 0, 1, 2 -> 0.10, 0.12, 0.14 (the older 0.90 run, the other suite's 7.0 and the
    # FAILED run's values do not count); t2 doubles every value.
    assert t1["piggyback"]["l1"]["n"] == 3
    assert t1["piggyback"]["l1"]["mean"] == pytest.approx(0.12)
    assert t1["piggyback"]["l1"]["std"] == pytest.approx(0.02)
    assert t2["piggyback"]["l1"]["mean"] == pytest.approx(0.24)
    assert t1["separate"]["l1"]["mean"] == pytest.approx(0.10)
    assert t1["separate"]["l1"]["std"] == pytest.approx(math.sqrt(((0.08 - .1) ** 2 + (0.09 - .1) ** 2 + 0.03 ** 2) / 2))
    assert t2["separate"]["stored_params"] == {"mean": 2000.0, "std": 0.0, "n": 3}
    assert t1["piggyback"]["fid"] == {"mean": None, "std": None, "n": 0}
    assert c["matrix"]["separate"]["bwt_l1"] == {"mean": 0.0, "std": 0.0, "n": 3}
    md = comparison_markdown(c)
    assert "| t1 | piggyback | 3 | 0.12 ± 0.02 |" in md and "| separate | 0, 1, 2 |" in md


def test_other_suite_sees_only_its_own_runs(store):
    tmp, uri = store
    params = _params(tmp, uri, "separate", 5, epochs=2)           # the other suite: only its piggyback run
    c = compare_methods(_summary(params, 0.2), params)
    assert c["methods"] == ["piggyback", "separate"]
    assert c["seeds"]["piggyback"] == ["2"]
    assert c["tasks"][0]["piggyback"]["l1"] == {"mean": 7.0, "std": None, "n": 1}
    assert c["tasks"][0]["separate"]["l1"]["mean"] == pytest.approx(0.2)


def test_a_rerun_of_a_logged_seed_replaces_it(store):
    tmp, uri = store
    params = _params(tmp, uri, "piggyback", 1)                     # seed 1 again: this run replaces the logged one
    c = compare_methods(_summary(params, 0.50), params)
    assert c["tasks"][0]["piggyback"]["l1"]["n"] == 2
    assert c["tasks"][0]["piggyback"]["l1"]["mean"] == pytest.approx((0.10 + 0.50) / 2)


def test_header_says_what_each_method_stores(tmp_path):
    uri = "sqlite:///unused.db"
    summary = _summary(_params(tmp_path, uri, "separate", 0), 0.1)
    assert "lambda 1 everywhere" in to_markdown(summary) and "lambda 0.25" not in to_markdown(summary)
    summary = {**_summary(_params(tmp_path, uri, "piggyback", 0), 0.1), "lam_overrides": {"first": None, "last": 1.0}}
    assert "lambda 0.25 (last 1.0)" in to_markdown(summary)
