"""End to end: `dvc repro` of a tiny embedded suite in a temporary copy of the repo.

Checks what a user relies on: the summary table (finite ground-truth metrics, growth equal to the
checkpoint metadata, zero forgetting), the MLflow store (pipeline run with its table, per-task runs),
and DVC's caching (a second repro runs nothing; changing one task re-runs that task and its
successors only; adding a task runs only its stages plus audit, matrix and report).
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
    "datasets": {k: {"source": "embedded", "kind": None, "size": 32, "n_train": 12, "n_test": 6,
                     "path": "piggyback/data/embedded.py"} for k in ("emb_a", "emb_b", "emb_c")},
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


def _copy_repo(dst: Path) -> Path:
    """This repo's tracked and new files (none ignored) in `dst`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def _commit(repo: Path) -> None:
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC copy of this repo with tiny params."""
    dst = _copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    kinds = [d["kind"] for d in yaml.safe_load((ROOT / "params.yaml").read_text())["datasets"].values()]

    def tiny(raw):
        raw["datasets"] = {k: dict(v, kind=kinds[i % len(kinds)]) for i, (k, v) in enumerate(TINY["datasets"].items())}
        for sec in ("data", "model", "train", "eval"):
            raw[sec].update(TINY[sec])
        given = list(raw["tasks"].values())   # keeps the spelled-out per-task keys (-S tasks.t2.epochs=2)
        raw["tasks"] = {f"t{i + 1}": dict(given[i], dataset=k, prev="init" if i == 0 else f"t{i}")
                        for i, k in enumerate(TINY["datasets"])}
    _edit_params(dst, tiny)
    _commit(dst)
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
    assert [line.count("|") for line in rows] == [14] * 3 + [12] * 3   # the table, then the do-nothing reference
    assert summary["matrix"]["summary"]["l1"]["bwt"] == 0.0 and summary["matrix"]["evaluated"] == 0   # nothing drifts
    for png in ("growth.png", "quality.png", "samples.png", "comparison.png", "matrix.png"):
        assert (repo / "metrics" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _numbers_only(value) -> bool:
    if isinstance(value, dict):
        return all(_numbers_only(v) for v in value.values())
    if isinstance(value, list):
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_metrics_files_hold_numbers_only(repo, first_repro):
    """Every value of every DVC metrics file is a number (or a list of numbers): `dvc exp show` stays
    narrow. Names, hashes and reasons are in the metrics/info/ sidecars."""
    shown = json.loads(subprocess.run(["dvc", "metrics", "show", "--json"], cwd=repo, env=_env(repo),
                                      capture_output=True, text=True, check=True, timeout=300).stdout)
    (workspace,) = shown.values()                       # keyed by revision ("" for the workspace)
    assert not [rel for rel, v in workspace["data"].items() if "error" in v], workspace
    files = set(workspace["data"])
    assert {"metrics/per_task.json", "metrics/tasks/t1.json", "metrics/train/t2.json", "metrics/forgetting.json"} <= files
    for rel in files:
        data = json.loads((repo / rel).read_text())
        assert data and _numbers_only(data), (rel, data)
    per_task = json.loads((repo / "metrics/per_task.json").read_text())
    assert list(per_task) == ["t1", "t2", "t3"] and list(per_task["t1"])[:3] == ["l1", "psnr", "ssim"]
    info = json.loads((repo / "metrics/info/tasks/t1.json").read_text())
    assert info["task"] == "t1" and info["fid_reason"]            # the text is kept beside
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert [r["name"] for r in summary["tasks"]] == ["t1", "t2", "t3"]   # a plain out, rows with names


def test_do_nothing_reference_for_paired_and_unpaired_tasks(repo, first_repro):
    """t1 (pix2pix, paired) and t2 (CycleGAN, unpaired with test truth): the scores of returning the input
    unchanged and of the mean training target sit beside the model's, and summary.md flags a loss to them."""
    from piggyback.donothing import worse_than_doing_nothing

    rows = {r["name"]: r for r in json.loads((repo / "metrics/summary.json").read_text())["tasks"]}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["tasks"]["t1"]["mode"] == "pix2pix" and params["tasks"]["t2"]["mode"] == "cyclegan"
    for name in ("t1", "t2"):
        info = json.loads((repo / f"metrics/info/tasks/{name}.json").read_text())
        for key in ("identity_l1", "identity_psnr", "identity_ssim", "mean_target_l1", "mean_target_ssim"):
            assert isinstance(rows[name][key], float) and rows[name][key] == info[key], (name, key)
        assert 0 < rows[name]["identity_l1"] < 1 and rows[name]["identity_l1"] != rows[name]["mean_target_l1"]
    md = (repo / "metrics/summary.md").read_text()
    assert "## Do-nothing reference" in md
    for name, r in rows.items():
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} |") and x.count("|") == 12)
        worse = worse_than_doing_nothing(r)
        assert ("**WORSE**" in line) == bool(worse) and all(w in line for w in worse), line


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
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    assert p.info.run_name == f"pipeline:{commit.strip()}"
    evals = {r.data.tags["task"]: r for r in runs if r.data.tags.get("kind") == "evaluate"}
    assert sorted(evals) == ["t1", "t2", "t3"] and evals["t1"].info.run_name == "evaluate:t1"
    assert evals["t1"].data.tags["train_run_id"] == p.data.tags["task_run.t1"] and "l1" in evals["t1"].data.metrics
    assert "l1" not in client.get_run(p.data.tags["task_run.t1"]).data.metrics   # the training run stays closed


def test_second_repro_runs_nothing(repo, first_repro):
    assert _ran(_run(["dvc", "repro"], repo)) == set()


def test_registered_model_served_over_rest(repo, first_repro, tmp_path):
    from test_serving import check_served_pipeline_model   # before the experiments below change the workspace

    check_served_pipeline_model(repo, tmp_path, _run)


def test_exp_run_changing_one_task_reruns_it_and_its_successors(repo, first_repro):
    ran = _ran(_run(["dvc", "exp", "run", "-n", "t2-longer", "-S", "tasks.t2.epochs=2"], repo))
    assert ran == {"train@t2", "train@t3", "evaluate@t2", "evaluate@t3", "audit", "matrix", "report"}
    assert json.loads((repo / "metrics/train/t2.json").read_text())["epochs"] == 3   # 2 + 1 decay


def test_exp_run_adding_a_task_runs_only_its_stages(repo, first_repro):
    ran = _ran(_run(["dvc", "exp", "run", "-n", "four-tasks", "-S",
                     "+tasks.t4={dataset:emb_a,prev:t3,mode:cyclegan}"], repo))
    assert ran == {"train@t4", "evaluate@t4", "audit", "matrix", "report"}
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert [r["name"] for r in summary["tasks"]] == ["t1", "t2", "t3", "t4"]
    assert summary["tasks"][3]["forgetting_exact"] is True

    # `dvc exp show` lists both experiments with per-task metrics.
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=_env(repo), capture_output=True,
                           text=True, check=True, timeout=300).stdout
    text = json.dumps(json.loads(shown))
    for name in ("t2-longer", "four-tasks", "metrics/tasks/t4.json", "metrics/per_task.json"):
        assert name in text, name

    # Each experiment logged its own pipeline run, tagged with the experiment's name.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("piggyback-gan").experiment_id],
                              filter_string="tags.kind = 'pipeline'")
    assert {"four-tasks", "t2-longer"} <= {r.data.tags.get("dvc.exp_name") for r in runs}


def test_own_folder_is_a_tracked_dependency(tmp_path):
    """A folder dataset: DVC notices an added file (`dvc status` names download@<key>), and prepare names
    a corrupt file by its path in the user's folder, as corrupt, even without a partner in B/."""
    from PIL import Image

    repo, folder = _copy_repo(tmp_path / "repo"), tmp_path / "my_photos"
    for side in ("A", "B"):
        (folder / side).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (40 * i, 100 if side == "A" else 200, 0)).save(folder / side / f"{i}.png")
    (folder / "A" / "broken.png").write_bytes(os.urandom(300))

    def own(raw):
        raw["datasets"] = {"mine": {"source": "folder", "path": str(folder)}}
        raw["tasks"] = {"t1": {"dataset": "mine", "prev": "init", "mode": "pix2pix"}}
    _edit_params(repo, own)
    _commit(repo)
    out = _run(["dvc", "repro", "prepare@mine"], repo)
    assert f"{folder}/A/broken.png: not an image" in out and "no file with the same name in B/" in out, out
    assert "data/raw/mine/A" not in out
    status = ["dvc", "status", "download@mine"]
    assert "up to date" in _run(status, repo)

    Image.new("RGB", (16, 16)).save(folder / "B" / "new.png")
    changed = _run(status, repo)
    assert "download@mine" in changed and "modified:" in changed and str(folder) in changed, changed


def test_dry_run_lists_every_stage_before_any_output_exists(tmp_path):
    """`piggyback dry-run` on a fresh copy with a new folder dataset: every stage's command in DVC's order,
    exit 0, nothing written (plain `dvc repro --dry` stops at prepare@<key>: data/raw/<key> is not made yet)."""
    from PIL import Image

    repo, folder = _copy_repo(tmp_path / "repo"), tmp_path / "my_sketches"
    for side in ("A", "B"):
        (folder / side).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(folder / side / "0.png")

    def own(raw):
        raw["datasets"]["mine"] = {"source": "folder", "path": str(folder)}
        raw["tasks"]["t4"] = {"dataset": "mine", "prev": "t3", "mode": "pix2pix"}
    _edit_params(repo, own)
    _commit(repo)
    out = _run([sys.executable, "-m", "piggyback.cli", "dry-run"], repo, timeout=300)
    ran = _ran(out)
    expected = {"download@mine", "prepare@mine", "init", "audit", "matrix", "report"}
    expected |= {f"{s}@t{i}" for s in ("train", "evaluate") for i in range(1, 5)}
    assert expected <= ran, out
    order = re.findall(r"Running stage '([^']+)'", out)
    assert order.index("prepare@mine") < order.index("train@t4") and order.index("train@t3") < order.index("train@t4")
    assert "> python -m stages.train --nproc" in out
    assert not (repo / "data/raw").exists() and not (repo / "models/init").exists() and not (repo / "dvc.lock").exists()

    only = _run([sys.executable, "-m", "piggyback.cli", "dry-run", "-s", "prepare@mine"], repo, timeout=300)
    assert _ran(only) == {"prepare@mine"}, only
