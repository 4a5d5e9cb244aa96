"""MLflow tracking behind one small wrapper that is a no-op off rank 0 (nanochat's DummyWandb idea).

The store is anchored at the real repository root ($DVC_ROOT, exported by DVC to every stage, also
under `dvc exp run --temp` and queued experiments), never MLflow's cwd-relative default, which a
temporary experiment folder would take with it. `mlflow` is imported lazily: the library imports
cleanly without it, and only rank 0 of a tracked stage pays for it. The client API is used instead
of the process-global fluent API, so several trackers may coexist in one process.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from piggyback.config import MlflowConfig
from piggyback.supervise import Terminated, terminate_on_signals


def repo_root() -> Path:
    """$DVC_ROOT when DVC runs the stage, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(cfg: MlflowConfig) -> str:
    """cfg.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def default_tags(task: str | None = None) -> dict[str, str]:
    """Tags linking a run to DVC: stage, experiment name, task, git commit (when there is one)."""
    tags = {"dvc.stage": os.environ.get("DVC_STAGE", ""), "dvc.exp_name": os.environ.get("DVC_EXP_NAME") or "workspace"}
    if task is not None:
        tags["task"] = task
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            tags["git.commit"] = sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {k: v for k, v in tags.items() if v}


class NullTracker:
    """Same methods as `Tracker`, doing nothing: used off rank 0 and when tracking is disabled."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_image(self, image: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, d: dict, artifact_file: str) -> None: ...
    def log_table(self, data: dict, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """One MLflow run, addressed by id through an `MlflowClient`."""

    def __init__(self, client: Any, run_id: str, logged: Optional[dict[str, int]] = None) -> None:
        self.client, self.run_id = client, run_id
        self.logged = logged or {}   # metric -> last step already in the run: not logged again (a resume)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()
                 if (step or 0) > self.logged.get(str(k), -1)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_image(self, image: Any, artifact_file: str) -> None:
        """`image`: uint8 HxWx3 numpy array or PIL image."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, d: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, d, artifact_file)

    def log_table(self, data: dict, artifact_file: str) -> None:
        """A table (column -> values) that `mlflow ui` shows in its artifact view and Evaluation tab."""
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


# MLflow 3's kind for model training. The 3.17 UI still opens in its GenAI mode unless the browser chose
# "Model training" (`?workflowType=machine_learning` in the URL, see `ui_link`); the tag files the
# experiment correctly for MLflow versions and tools that read it.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ui_link(cfg: MlflowConfig, run_id: str) -> str:
    """Where `mlflow ui` (default port) shows this run in its "Model training" mode."""
    from mlflow import MlflowClient

    exp_id = MlflowClient(tracking_uri=tracking_uri(cfg)).get_run(run_id).info.experiment_id
    return f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"


def experiment_id(client: Any, name: str) -> str:
    """Get or create the experiment, its artifacts under <repo root>/mlartifacts (fixed at creation), of the
    model-training kind (also set on older experiments that have no kind)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=(repo_root() / "mlartifacts").as_uri(),
                                            tags=EXPERIMENT_KIND)
        except MlflowException:  # another process created it between our lookup and create
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if key not in exp.tags:   # a kind the user chose is kept
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _last_steps(client: Any, run_id: str) -> dict[str, int]:
    """metric -> the last step the run holds for it."""
    keys = client.get_run(run_id).data.metrics
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}


def open_run(
    cfg: MlflowConfig,
    rank: int,
    run_name: str,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    run_id: str | None = None,
    resume: bool = False,
) -> NullTracker:
    """Start a run (or reopen `run_id`) on rank 0; a `NullTracker` elsewhere. With `resume` (training
    continued from a snapshot) metrics are logged only at steps after the last one the run holds."""
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        tracker = Tracker(client, run_id, _last_steps(client, run_id) if resume else None)
    else:
        run = client.create_run(experiment_id(client, cfg.experiment), tags=dict(tags or {}), run_name=run_name)
        tracker = Tracker(client, run.info.run_id)
    if params and run_id is None:  # params are immutable per run: log them once, at creation
        tracker.log_params(params)
    return tracker


def close_leftover_runs(cfg: MlflowConfig, rank: int, tags: dict[str, str], keep: Optional[str] = None) -> list[str]:
    """End as KILLED every RUNNING run of the experiment carrying all of `tags` (except `keep`): what a
    SIGKILLed stage left open. Call only while no other process of the same stage can be alive."""
    if rank != 0 or not cfg.enabled:
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return []
    where = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'RUNNING'"])
    closed = [r.info.run_id for r in client.search_runs([exp.experiment_id], filter_string=where, max_results=1000)
              if r.info.run_id != keep]
    for run_id in closed:
        client.set_terminated(run_id, "KILLED")
    return closed


@contextlib.contextmanager
def ended(tracker: NullTracker) -> Iterator[NullTracker]:
    """End the run when the block ends: FINISHED, KILLED (SIGTERM / SIGINT) or FAILED (any other error)."""
    try:
        yield tracker
    except (Terminated, KeyboardInterrupt):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: params as MLflow shows and filters them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_evaluation(cfg: MlflowConfig, task: str, train_run_id: str | None, metrics: dict[str, Any],
                   artifacts: Iterable[Path] = ()) -> str:
    """Log `metrics` into a new ``evaluate:<task>`` run (numbers as metrics, text as ``eval.*`` tags, grids
    as artifacts), nested under and tagged with the task's training run, which stays closed: reopening it
    stretched its duration and left it RUNNING when evaluation was killed. Returns a one-line note."""
    if not cfg.enabled:
        return "MLflow disabled (mlflow.enabled: false): not logged"
    numbers = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    tags = {**default_tags(task), "kind": "evaluate",
            **{f"eval.{k}": v for k, v in metrics.items() if isinstance(v, (str, bool))}}
    if train_run_id:
        tags.update({"train_run_id": train_run_id, "mlflow.parentRunId": train_run_id})
    try:   # an evaluate:<task> run a SIGKILLed evaluation left RUNNING is closed (KILLED) first
        close_leftover_runs(cfg, 0, {k: tags[k] for k in ("task", "kind", "dvc.exp_name")})
        tracker = open_run(cfg, rank=0, run_name=f"evaluate:{task}", tags=tags)
    except Exception as e:  # noqa: BLE001 - the JSON file is the record; a tracking failure is only a warning
        return f"MLflow: could not start the evaluate:{task} run ({type(e).__name__}: {e}): not logged"
    try:
        with terminate_on_signals(), ended(tracker):   # SIGTERM / SIGINT end it KILLED, errors FAILED
            tracker.log_metrics(numbers)
            for path in artifacts:
                tracker.log_artifact(path, "evaluation")
    except Exception as e:  # noqa: BLE001
        return f"MLflow: logging into run {tracker.run_id} failed ({type(e).__name__}: {e})"
    return f"logged {len(numbers)} metrics into MLflow run evaluate:{task} ({tracker.run_id})"
