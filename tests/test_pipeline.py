"""End to end: `dvc repro` of a tiny embedded suite in a temporary copy of the repo.

Checks what a user relies on: the summary table (finite ground-truth metrics, growth equal to the
checkpoint metadata, zero forgetting), the MLflow store (pipeline run with its table, per-task runs),
and DVC's caching (a second repro runs nothing; changing one task re-runs that task and its
successors only; adding a task runs only its stages plus audit and report).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "datasets": {
        "emb_a": {"source": "embedded", "kind": None, "size": 32, "n_train": 12, "n_test": 6},
        "emb_b": {"source": "embedded", "kind": None, "size": 32, "n_train": 12, "n_test": 6},
        "emb_c": {"source": "embedded", "kind": None, "size": 32, "n_train": 12, "n_test": 6},
    },
    "data": {"load_size": 36, "crop_size": 32},
    "model": {"ngf": 4, "ndf": 4, "netG": "resnet_6blocks"},
    "train": {"epochs": 1, "epochs_decay": 1, "batch_size": 4, "snapshot_every": 0, "probe_images": 2, "log_every": 1},
    "eval": {"grid_images": 4},
}


def _env(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1", TORCH_HOME=str(repo / ".torch_home"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(cmd: list[str], repo: Path, timeout: int = 900) -> str:
    out = subprocess.run(cmd, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _edit_params(repo: Path, fn) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    fn(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC copy of this repo (tracked and new files, none ignored) with tiny params."""
    dst = tmp_path_factory.mktemp("pipeline") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    kinds = [d["kind"] for d in yaml.safe_load((ROOT / "params.yaml").read_text())["datasets"].values()]

    def tiny(raw):
        raw["datasets"] = {k: dict(v, kind=kinds[i % len(kinds)]) for i, (k, v) in enumerate(TINY["datasets"].items())}
        for sec in ("data", "model", "train", "eval"):
            raw[sec].update(TINY[sec])
        given = list(raw["tasks"].values())   # keeps the spelled-out per-task keys (-S tasks.t2.epochs=2)
        raw["tasks"] = {f"t{i + 1}": dict(given[i], dataset=k, prev="init" if i == 0 else f"t{i}")
                        for i, k in enumerate(TINY["datasets"])}
    _edit_params(dst, tiny)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


@pytest.fixture(scope="module")
def first_repro(repo: Path) -> str:
    return _run(["dvc", "repro"], repo)


def test_summary_table(repo, first_repro):
    summary = json.loads((repo / "metrics/summary.json").read_text())
    names = [r["name"] for r in summary["tasks"]]
    assert names == ["t1", "t2", "t3"]
    meta = json.loads((repo / "models/t3/meta.json").read_text())
    recorded = {t["name"]: t for t in meta["tasks"]}
    for row in summary["tasks"]:
        for key in ("l1", "psnr", "ssim"):
            assert isinstance(row[key], float) and row[key] == row[key], (row["name"], key, row)
        assert row["fid"] is None and row["fid_reason"]  # no Inception weights offline: unavailable, with why
        for key in ("new_params", "stored_params", "separate_params"):
            assert row[key] == recorded[row["name"]][key]
        assert row["forgetting_max_abs_diff"] == 0.0 and row["forgetting_exact"] is True
    stored = [r["stored_params"] for r in summary["tasks"]]
    assert stored[0] < stored[1] < stored[2] < summary["tasks"][-1]["separate_params"] * 3
    rows = [line for line in (repo / "metrics/summary.md").read_text().splitlines() if re.match(r"\| t\d+ \|", line)]
    assert len(rows) == 3 and all(line.count("|") == 14 for line in rows)
    for png in ("growth.png", "quality.png", "samples.png", "comparison.png"):
        assert (repo / "metrics" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_store_holds_pipeline_and_task_runs(repo, first_repro):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("piggyback-gan")
    runs = client.search_runs([exp.experiment_id])
    pipeline = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(pipeline) == 1
    p = pipeline[0]
    arts = {a.path for a in client.list_artifacts(p.info.run_id)}
    assert {"summary_table.json", "summary.md", "growth.png"} <= arts
    assert {"l1/t1", "stored_params/t3"} <= set(p.data.metrics)
    task_runs = {r.info.run_id for r in runs if r.data.tags.get("task")}
    linked = {v for k, v in p.data.tags.items() if k.startswith("task_run.")}
    assert len(linked) == 3 and linked <= task_runs
    t1 = client.get_run(p.data.tags["task_run.t1"])
    assert "l1" in t1.data.metrics  # the evaluate stage logged into the task's training run


def test_second_repro_runs_nothing(repo, first_repro):
    assert _ran(_run(["dvc", "repro"], repo)) == set()


def test_registered_model_served_over_rest(repo, first_repro, tmp_path):
    from test_serving import check_served_pipeline_model   # before the experiments below change the workspace

    check_served_pipeline_model(repo, tmp_path, _run)


def test_exp_run_changing_one_task_reruns_it_and_its_successors(repo, first_repro):
    ran = _ran(_run(["dvc", "exp", "run", "-n", "t2-longer", "-S", "tasks.t2.epochs=2"], repo))
    assert ran == {"train@t2", "train@t3", "evaluate@t2", "evaluate@t3", "audit", "report"}
    assert json.loads((repo / "metrics/train/t2.json").read_text())["epochs"] == 3   # 2 + 1 decay


def test_exp_run_adding_a_task_runs_only_its_stages(repo, first_repro):
    ran = _ran(_run(["dvc", "exp", "run", "-n", "four-tasks", "-S",
                     "+tasks.t4={dataset:emb_a,prev:t3,mode:cyclegan}"], repo))
    assert ran == {"train@t4", "evaluate@t4", "audit", "report"}
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert [r["name"] for r in summary["tasks"]] == ["t1", "t2", "t3", "t4"]
    assert summary["tasks"][3]["forgetting_exact"] is True

    # `dvc exp show` lists both experiments with per-task metrics.
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=_env(repo), capture_output=True,
                           text=True, check=True, timeout=300).stdout
    text = json.dumps(json.loads(shown))
    for name in ("t2-longer", "four-tasks", "metrics/tasks/t4.json", "metrics/summary.json"):
        assert name in text, name

    # Each experiment logged its own pipeline run, tagged with the experiment's name.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("piggyback-gan").experiment_id],
                              filter_string="tags.kind = 'pipeline'")
    assert {"four-tasks", "t2-longer"} <= {r.data.tags.get("dvc.exp_name") for r in runs}
