"""Resume: a run stopped after a snapshot and started again ends with the weights of an uninterrupted run."""
import csv
import os
import signal
import subprocess
import time

import pytest

from piggyback import snapshot
from piggyback.checkpoint import load_lifelong
from train_helpers import (generators, max_abs_diff, run_cmd, run_init, run_train, single_thread,  # noqa: F401
                           stage_cmd, stage_env, uninterrupted_t1, write_params)

TASKS = {"t1": {"dataset": "daynight", "prev": "init", "mode": "cyclegan"}}
# Everything that carries state across steps: a pool that fills after 2 images (then draws from its own
# RNG), dropout (torch RNG), a decaying learning rate (scheduler), Adam moments, mid-epoch positions.
MODEL = {"use_dropout": True}
TRAIN = {"epochs": 2, "epochs_decay": 1, "snapshot_every": 3, "cyclegan": {"pool_size": 2}}


def _rows(metrics):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader((metrics / "train" / "t1.csv").open())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: 3 epochs x 4 steps."""
    tmp = tmp_path_factory.mktemp("ref")
    data, metrics = uninterrupted_t1(tmp, TASKS, model=MODEL, train=TRAIN)
    return {"data": data, "weights": generators(tmp / "models" / "t1"), "rows": _rows(metrics)}


@pytest.mark.parametrize("crash_after, where", [(2, "epoch 1, step 4"), (3, "epoch 2, step 6")])
def test_crash_then_resume_is_exact(tmp_path, monkeypatch, capsys, reference, crash_after, where):
    """Crash right after the n-th snapshot (at an epoch end / mid-epoch), run again: same weights and losses."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = write_params(tmp_path / "params.yaml", TASKS, model=MODEL, train=TRAIN, mlflow={"enabled": True})
    models, metrics, data = tmp_path / "models", tmp_path / "metrics", reference["data"]
    run_init(params, models)
    real_save, saves = snapshot.save, []

    def save_then_crash(directory, state):
        path = real_save(directory, state)
        saves.append(state["step"])
        if len(saves) == crash_after:
            raise RuntimeError("simulated crash")
        return path

    monkeypatch.setattr(snapshot, "save", save_then_crash)
    with pytest.raises(SystemExit, match="train@t1: RuntimeError: simulated crash .*resumes from it"):
        run_train("t1", params, models, data, metrics)
    assert not (models / "t1").exists() and (models / ".snapshots" / "t1" / "snapshot.pt").is_file()
    run_id = snapshot.load(models / ".snapshots" / "t1")["run_id"]
    monkeypatch.setattr(snapshot, "save", real_save)
    capsys.readouterr()

    run_train("t1", params, models, data, metrics)
    assert f"Resuming t1 from snapshot at {where}" in capsys.readouterr().out
    assert not (models / ".snapshots").exists()                 # only the final checkpoint remains
    assert max_abs_diff(generators(models / "t1"), reference["weights"]) <= 1e-6
    assert _rows(metrics) == reference["rows"]                  # every epoch's losses and lr, too
    rec = load_lifelong(models / "t1").tasks[0]
    assert rec["mlflow_run_id"] == run_id                       # the same MLflow run continued

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss/G")] == list(range(1, 13))


def test_resumed_run_logs_no_step_twice(tmp_path, monkeypatch, reference):
    """Steps logged after the last snapshot and before the crash are not logged again by the resumed run."""
    from mlflow import MlflowClient

    from piggyback.progress import PlainProgress

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = write_params(tmp_path / "params.yaml", TASKS, model=MODEL, train=TRAIN, mlflow={"enabled": True})
    models, metrics = tmp_path / "models", tmp_path / "metrics"
    run_init(params, models)
    real_update = PlainProgress.update   # the bar off a terminal (pytest captures stderr)

    def crash_at_step_5(self, n=1):
        if self.n + n == 5:   # steps 1-4 logged, snapshot at step 3
            raise RuntimeError("simulated crash")
        real_update(self, n)

    monkeypatch.setattr(PlainProgress, "update", crash_at_step_5)
    with pytest.raises(SystemExit, match="simulated crash"):
        run_train("t1", params, models, reference["data"], metrics)
    monkeypatch.setattr(PlainProgress, "update", real_update)
    run_id = snapshot.load(models / ".snapshots" / "t1")["run_id"]
    run_train("t1", params, models, reference["data"], metrics)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.step for m in client.get_metric_history(run_id, "loss/G")] == list(range(1, 13))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_stale_snapshot_is_ignored(tmp_path, monkeypatch, capsys, reference):
    params = write_params(tmp_path / "params.yaml", TASKS, model=MODEL, train=TRAIN)
    models, data = tmp_path / "models", reference["data"]
    run_init(params, models)
    real_save = snapshot.save

    def crash(directory, state):
        real_save(directory, state)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(snapshot, "save", crash)
    with pytest.raises(SystemExit, match="simulated crash"):
        run_train("t1", params, models, data, tmp_path / "metrics")
    monkeypatch.setattr(snapshot, "save", real_save)
    params = write_params(tmp_path / "params.yaml", TASKS, model=MODEL, train={**TRAIN, "lr": 1e-4})
    capsys.readouterr()
    run_train("t1", params, models, data, tmp_path / "metrics")
    out = capsys.readouterr().out
    assert "Ignoring the snapshot" in out and "Resuming" not in out
    assert load_lifelong(models / "t1").tasks[0]["train"]["steps"] == 12


@pytest.mark.slow
def test_sigkill_and_rerun(tmp_path, reference):
    """SIGKILL the stage process once a snapshot exists; the re-run resumes and matches the reference."""
    params = write_params(tmp_path / "params.yaml", TASKS, model=MODEL, train={**TRAIN, "snapshot_every": 2},
                          mlflow={"enabled": True})
    models, metrics, data = tmp_path / "models", tmp_path / "metrics", reference["data"]
    run_init(params, models)
    cmd = stage_cmd("t1", params, models, data, metrics)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=stage_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    snap = models / ".snapshots" / "t1" / "snapshot.pt"
    deadline = time.monotonic() + 240
    while not snap.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()
    assert snap.exists() and not (models / "t1").exists()
    killed_at = snapshot.load(snap.parent)["step"]
    assert 0 < killed_at < 12

    out = run_cmd(cmd, tmp_path)
    assert "Resuming t1 from snapshot at epoch" in out.stdout
    assert not (models / ".snapshots").exists()
    assert max_abs_diff(generators(models / "t1"), reference["weights"]) <= 1e-6
    assert _rows(metrics) == reference["rows"]
