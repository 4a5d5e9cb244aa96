"""MLflow wrapper: store location, rank-0 only, run contents, reopening a run after a resume."""
import numpy as np
import pytest

from piggyback.config import MlflowConfig
from piggyback import tracking
from piggyback.tracking import NullTracker, Tracker, flatten, open_run, tracking_uri


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri(MlflowConfig()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(MlflowConfig()).endswith(f"{tmp_path.resolve()}/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking_uri(MlflowConfig()) == "sqlite:///elsewhere.db"
    assert tracking_uri(MlflowConfig(tracking_uri="http://server:5000")) == "http://server:5000"


def test_null_tracker_off_rank_zero_and_when_disabled(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/dir/never.db")
    for t in (open_run(MlflowConfig(), rank=1, run_name="x"), open_run(MlflowConfig(enabled=False), rank=0, run_name="x")):
        assert type(t) is NullTracker and t.run_id is None
        t.log_params({"a": 1}), t.log_metrics({"m": 1.0}, step=1), t.log_dict({}, "d.json"), t.end()
    assert all(hasattr(NullTracker, m) for m in dir(Tracker) if not m.startswith("_"))


def test_flatten():
    assert flatten({"train": {"lr": 1, "cyclegan": {"pool_size": 50}}, "task": "t1", "e": {}}) == {
        "train.lr": 1, "train.cyclegan.pool_size": 50, "task": "t1", "e": {}}


def test_run_contents_and_reopen(monkeypatch, tmp_path):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "train@t1")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    cfg = MlflowConfig(experiment="unit")
    params = {f"train.k{i}": i for i in range(150)}  # more than one log_batch of params
    t = open_run(cfg, 0, "train@t1", tags=tracking.default_tags("t1"), params=params)
    assert isinstance(t, Tracker)
    for step in range(3):
        t.log_metrics({"loss/G": 1.0 / (step + 1)}, step=step)
    t.log_image(np.zeros((8, 16, 3), np.uint8), "samples/epoch_001.png")
    t.log_dict({"a": 1}, "counts.json")
    t.set_tags({"extra": "yes"})

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    exp = client.get_experiment_by_name("unit")
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    run = client.get_run(t.run_id)
    assert run.info.run_name == "train@t1" and run.info.status == "RUNNING"
    assert run.data.tags["dvc.stage"] == "train@t1" and run.data.tags["dvc.exp_name"] == "workspace"
    assert run.data.tags["task"] == "t1" and run.data.tags["extra"] == "yes"
    assert len(run.data.params) == 150 and run.data.params["train.k7"] == "7"
    assert [m.step for m in client.get_metric_history(t.run_id, "loss/G")] == [0, 1, 2]
    arts = {a.path for a in client.list_artifacts(t.run_id)} | {a.path for a in client.list_artifacts(t.run_id, "samples")}
    assert {"counts.json", "samples/epoch_001.png"} <= arts

    # A killed-and-resumed task logs into the same run; params (immutable) are not logged again.
    t2 = open_run(cfg, 0, "train@t1", params={"train.k7": "changed"}, run_id=t.run_id)
    t2.log_metrics({"loss/G": 0.1}, step=3)
    t2.end()
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.k7"] == "7"
    assert len(client.get_metric_history(t.run_id, "loss/G")) == 4
    assert tracking.experiment_id(client, "unit") == exp.experiment_id  # found, not re-created


def test_experiment_creation_race(monkeypatch, tmp_path):
    """Two stages creating the experiment at once: the loser finds the winner's experiment."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/race.db")
    winner = client.create_experiment("race")
    real_get = client.get_experiment_by_name
    calls = []

    def get_once_missing(name):
        calls.append(name)
        return None if len(calls) == 1 else real_get(name)

    monkeypatch.setattr(client, "get_experiment_by_name", get_once_missing)
    assert tracking.experiment_id(client, "race") == winner
    monkeypatch.setattr(client, "get_experiment_by_name", lambda name: None)
    with pytest.raises(MlflowException):
        tracking.experiment_id(client, "race")


def _mlflow_env(monkeypatch, tmp_path):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    cfg = MlflowConfig(experiment="unit")
    return cfg, MlflowClient(tracking_uri=tracking_uri(cfg))


def _sigterm_during(monkeypatch, method: str):
    """Make `Tracker.<method>` deliver SIGTERM to this process, as `kill` would mid-logging."""
    import os
    import signal

    def killed(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Tracker, method, killed)


def test_evaluation_run_killed_by_sigterm_ends_killed_and_a_sigkill_leftover_is_closed(monkeypatch, tmp_path):
    from piggyback.supervise import Terminated

    cfg, client = _mlflow_env(monkeypatch, tmp_path)
    # What a SIGKILLed evaluation leaves: its evaluate:t1 run RUNNING.
    left = open_run(cfg, 0, "evaluate:t1", tags={**tracking.default_tags("t1"), "kind": "evaluate"})
    note = tracking.log_evaluation(cfg, "t1", None, {"l1": 0.5})
    assert client.get_run(left.run_id).info.status == "KILLED"
    new = client.search_runs([client.get_experiment_by_name("unit").experiment_id],
                             filter_string="attributes.status = 'FINISHED'")
    assert [r.info.run_name for r in new] == ["evaluate:t1"] and new[0].info.run_id in note
    assert new[0].data.metrics["l1"] == 0.5

    _sigterm_during(monkeypatch, "log_metrics")
    with pytest.raises(Terminated):
        tracking.log_evaluation(cfg, "t2", None, {"l1": 0.5})
    killed = client.search_runs([client.get_experiment_by_name("unit").experiment_id],
                                filter_string="attributes.run_name = 'evaluate:t2'")
    assert [r.info.status for r in killed] == ["KILLED"]


def test_pipeline_run_killed_by_sigterm_ends_killed_and_the_next_report_closes_leftovers(monkeypatch, tmp_path):
    from piggyback.config import load_params
    from piggyback.report import log_pipeline_run
    from piggyback.supervise import Terminated

    cfg, client = _mlflow_env(monkeypatch, tmp_path)
    params = load_params("params.yaml")
    params = type(params)(**{**params.__dict__, "mlflow": cfg})
    summary = {"method": "piggyback", "suite": "s", "tasks": []}
    left = open_run(cfg, 0, "pipeline:x", tags={"kind": "pipeline", "dvc.exp_name": "workspace"})
    _sigterm_during(monkeypatch, "log_metrics")
    with pytest.raises(Terminated):
        log_pipeline_run(summary, params, [])
    runs = {r.info.run_id: r.info.status for r in client.search_runs(
        [client.get_experiment_by_name("unit").experiment_id])}
    assert runs.pop(left.run_id) == "KILLED"                 # the SIGKILL leftover, closed by the next report
    assert list(runs.values()) == ["KILLED"]                 # the report run the SIGTERM stopped


def test_ui_link_opens_the_run_in_model_training_mode(monkeypatch, tmp_path):
    """MLflow 3.17's UI starts in its GenAI mode; the printed link switches it to "Model training"."""
    cfg, client = _mlflow_env(monkeypatch, tmp_path)
    t = open_run(cfg, 0, "pipeline:x", tags={"kind": "pipeline"})
    exp_id = client.get_run(t.run_id).info.experiment_id
    assert tracking.ui_link(cfg, t.run_id) == \
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{t.run_id}?workflowType=machine_learning"
