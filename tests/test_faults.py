"""Fault injection: kill the train stage at chosen points, run it again, and check what is left behind.

After every fault and re-run: the checkpoint equals an uninterrupted run's, no process of the killed
run is alive (within 5 s), no temporary file is left inside the tracked folders, no MLflow run is
RUNNING and no metric step was logged twice. The stage runs as dvc.yaml runs it (`python -m
stages.train --nproc 1 <task>`: launcher -> torchrun -> worker) in a subprocess; a `sitecustomize.py`
on the subprocess's path makes `torch.save` write half a file and SIGKILL its process when the file
name matches $FAULT_KILL_SAVING (a kill during a save).
"""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from piggyback import snapshot
from train_helpers import (REPO, generators, max_abs_diff, run_init, run_train, single_thread,  # noqa: F401
                           stage_cmd, stage_env, uninterrupted_t1, write_params)

TASKS = {"t1": {"dataset": "daynight", "prev": "init", "mode": "cyclegan"}}
TRAIN = {"epochs": 2, "epochs_decay": 2, "snapshot_every": 2, "cyclegan": {"pool_size": 2}}   # 16 steps
STEPS = 16
KILL_ON_SAVE = textwrap.dedent("""
    import io, os, signal
    _target = os.environ.get("FAULT_KILL_SAVING")
    if _target:
        import torch
        _save = torch.save
        def _save_then_die(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and _target in os.fspath(f):
                buf = io.BytesIO()
                _save(obj, buf, *args, **kwargs)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return _save(obj, f, *args, **kwargs)
        torch.save = _save_then_die
""")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process."""
    tmp = tmp_path_factory.mktemp("ref")
    data, _ = uninterrupted_t1(tmp, TASKS, train=TRAIN)
    return {"data": data, "weights": generators(tmp / "models" / "t1")}


class Stage:
    """The train stage of one workspace, run as subprocesses tagged with a marker in their environment."""

    def __init__(self, tmp: Path, data: Path) -> None:
        self.tmp, self.data, self.models, self.metrics = tmp, data, tmp / "models", tmp / "metrics"
        self.params = write_params(tmp / "params.yaml", TASKS, train=TRAIN, mlflow={"enabled": True})
        run_init(self.params, self.models)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(KILL_ON_SAVE)
        self.marker = f"FAULT_TEST_{uuid.uuid4().hex}"

    def env(self, **extra: str) -> dict:
        env = stage_env(self.tmp)
        env.update(PYTHONPATH=f"{self.tmp / 'site'}{os.pathsep}{REPO}", **{self.marker: "1"}, **extra)
        return env

    def start(self, nproc: int = 1, **extra: str) -> subprocess.Popen:
        cmd = stage_cmd("t1", self.params, self.models, self.data, self.metrics)   # python -m stages.train t1 ...
        if nproc:
            cmd = cmd[:3] + ["--nproc", str(nproc)] + cmd[3:]                        # as dvc.yaml runs it
        return subprocess.Popen(cmd, cwd=self.tmp, env=self.env(**extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def alive(self) -> list[int]:
        """PIDs of live processes of this workspace's runs."""
        mark, pids = f"{self.marker}=1".encode(), []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0") and \
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                continue
        return pids

    def assert_all_gone(self, within_s: float = 5.0) -> None:
        deadline = time.monotonic() + within_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.alive()
        for pid in left:   # do not leak them into the rest of the test session
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the killed run still alive {within_s} s later: {left}"

    def children(self, pid: int) -> list[int]:
        path = Path(f"/proc/{pid}/task/{pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def finish(self) -> subprocess.CompletedProcess:
        """Run the stage again (one process) to the end."""
        p = subprocess.run(stage_cmd("t1", self.params, self.models, self.data, self.metrics), cwd=self.tmp,
                           env=self.env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        return p

    def assert_clean_and_equal(self, reference: dict) -> None:
        from mlflow import MlflowClient

        assert max_abs_diff(generators(self.models / "t1"), reference["weights"]) <= 1e-6
        temps = [p for root in (self.models, self.metrics) for p in root.rglob("*") if ".tmp" in p.name]
        assert not temps and not (self.models / ".snapshots").exists(), temps
        client = MlflowClient(tracking_uri=f"sqlite:///{self.tmp}/mlflow.db")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
        for run in runs:
            for key in run.data.metrics:
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert len(steps) == len(set(steps)), f"{key}: steps logged twice: {sorted(steps)}"
        done = [r for r in runs if r.info.status == "FINISHED"]
        assert len(done) == 1
        assert [m.step for m in client.get_metric_history(done[0].info.run_id, "loss/G")] == list(range(1, STEPS + 1))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared:\n{proc.communicate()[1] if proc.poll() is not None else ''}"


@pytest.mark.slow
def test_sigkill_of_torchrun_leaves_no_worker_and_the_rerun_matches(tmp_path, reference):
    stage = Stage(tmp_path, reference["data"])
    launcher = stage.start(nproc=1)
    _wait_for(stage.models / ".snapshots" / "t1" / "snapshot.pt", launcher)
    (torchrun,) = stage.children(launcher.pid)
    os.kill(torchrun, signal.SIGKILL)
    stage.assert_all_gone(within_s=5.0)
    err = launcher.communicate(timeout=30)[1]
    assert launcher.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("train@t1: ") and "dvc repro train@t1" in last, err[-3000:]
    assert not (stage.models / "t1").exists() and snapshot.load(stage.models / ".snapshots" / "t1") is not None

    out = stage.finish()
    assert "Resuming t1 from snapshot" in out.stdout
    stage.assert_clean_and_equal(reference)


@pytest.mark.slow
def test_rank_killed_while_saving_snapshot_then_checkpoint(tmp_path, reference):
    """SIGKILL of the rank in the middle of its first snapshot (no snapshot yet: the re-run starts over and
    closes the run left RUNNING), then in the middle of the final checkpoint (the re-run resumes)."""
    stage = Stage(tmp_path, reference["data"])
    first = stage.start(nproc=1, FAULT_KILL_SAVING="snapshot.pt")
    err = first.communicate(timeout=300)[1]
    assert first.returncode != 0
    assert err.strip().splitlines()[-1].startswith("train@t1: training stopped"), err[-3000:]
    stage.assert_all_gone()
    assert list((stage.models / ".snapshots" / "t1").glob(".snapshot.pt.*.tmp"))   # the torn write

    second = stage.start(nproc=0, FAULT_KILL_SAVING="generators.pt")
    out, err = second.communicate(timeout=300)
    assert second.returncode == -signal.SIGKILL, err[-3000:]
    assert "closed MLflow run(s)" in out and "left RUNNING by a killed trainer" in out
    assert list(stage.models.glob(".t1.*.tmp"))                                   # a torn checkpoint folder

    out = stage.finish().stdout
    assert "Resuming t1 from snapshot" in out
    stage.assert_clean_and_equal(reference)


def test_second_trainer_of_a_task_stops_naming_the_first(tmp_path, reference):
    params = write_params(tmp_path / "params.yaml", TASKS, train=TRAIN)
    models = tmp_path / "models"
    run_init(params, models)
    holder = snapshot.TrainerLock(snapshot.snapshot_dir(models, "t1"))
    holder.acquire()   # the first trainer (this process, through another open file)
    try:
        with pytest.raises(SystemExit) as exc:
            run_train("t1", params, models, reference["data"], tmp_path / "metrics")
    finally:
        holder.release()
    msg = str(exc.value.code)
    assert msg.startswith("train@t1: ") and f"PID {os.getpid()} on host" in msg and "already training" in msg, msg
    assert not (models / "t1").exists()


def test_stale_lock_of_a_dead_trainer_is_taken_over(tmp_path, reference, capsys):
    params = write_params(tmp_path / "params.yaml", TASKS, train={**TRAIN, "max_steps": 2})
    models = tmp_path / "models"
    run_init(params, models)
    lock = snapshot.snapshot_dir(models, "t1") / snapshot.LOCK
    lock.parent.mkdir(parents=True)
    lock.write_text("PID 999999 on host elsewhere (since 2026-01-01 00:00:00)")   # nobody holds the flock
    run_train("t1", params, models, reference["data"], tmp_path / "metrics")
    assert "Taking over" in capsys.readouterr().out and (models / "t1" / "meta.json").is_file()
    assert not (models / ".snapshots").exists()


def test_sigterm_ends_the_mlflow_run_killed_in_one_line(tmp_path, monkeypatch, reference):
    """SIGTERM mid-training: one line naming the task and the way to resume; the MLflow run is KILLED."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = write_params(tmp_path / "params.yaml", TASKS, train=TRAIN, mlflow={"enabled": True})
    models = tmp_path / "models"
    run_init(params, models)
    real_save = snapshot.save

    class Unhandled(Exception):
        pass

    def unhandled(signum, frame):   # what SIGTERM does to a stage without its own handler: no cleanup
        raise Unhandled

    def save_then_sigterm(directory, state):
        real_save(directory, state)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(snapshot, "save", save_then_sigterm)
    old = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(SystemExit) as exc:
            run_train("t1", params, models, reference["data"], tmp_path / "metrics")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert signal.getsignal(signal.SIGTERM) is old
    msg = str(exc.value.code)
    assert msg.startswith("train@t1: stopped by SIGTERM") and "dvc repro train@t1" in msg, msg
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"


def test_check_params_refuses_a_bad_value_before_make_repro_runs_dvc(tmp_path, capsys):
    from piggyback.cli import main as cli

    bad = write_params(tmp_path / "params.yaml", {"t1": {**TASKS["t1"], "lam": 0}})
    assert cli(["check-params", str(bad)]) == 2
    assert "tasks.t1.lam" in capsys.readouterr().err or "lam" in capsys.readouterr().err
    good = write_params(tmp_path / "good.yaml", TASKS)
    assert cli(["check-params", str(good)]) == 0
    recipe = (REPO / "Makefile").read_text().split("\nrepro:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("check-params") < recipe.index("dvc repro")
