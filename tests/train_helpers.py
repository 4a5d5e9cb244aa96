"""Helpers for the training tests: tiny embedded datasets, tiny params.yaml files, stage runners.

Everything is small enough for a 2-core CPU: 32x32 images, ngf/ndf 4, a few steps. Stages run either
in-process (`run_init` / `run_train`, fast) or as subprocesses (`stage_cmd`, for torchrun and kill tests),
always single-threaded per process so that a loaded CI machine stays fast and results are repeatable.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
if str(REPO) not in sys.path:  # `stages` is not an installed package
    sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread in this process (import this fixture into a test module to use it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

DATASETS = {  # key: (embedded kind, size, n_train, n_test)
    "edges": ("edges", 32, 8, 4),
    "daynight": ("daynight", 32, 8, 4),
    "thermal": ("thermal", 32, 8, 4),
    "facades": ("facades", 32, 8, 4),
}


def make_data(root: Path, keys=("edges", "daynight"), specs: dict | None = None) -> Path:
    """Generate and prepare embedded datasets under root/raw and root/prepared; returns root/prepared."""
    from piggyback.data.embedded import generate
    from piggyback.data.prepare import prepare_dataset

    specs = specs or DATASETS
    for key in keys:
        kind, size, n_train, n_test = specs[key]
        if not (root / "prepared" / key).is_dir():
            generate(kind, root / "raw" / key, seed=0, size=size, n_train=n_train, n_test=n_test)
            prepare_dataset(root / "raw" / key, root / "prepared" / key, dataset=key, workers=1)
    return root / "prepared"


def write_params(path: Path, tasks: dict, *, model=None, train=None, data=None, mlflow=None, datasets=None,
                 seed: int = 0, specs: dict | None = None) -> Path:
    """A params.yaml with tiny defaults; keyword dicts override single keys of each section."""
    specs = specs or DATASETS
    used = {t["dataset"] for t in tasks.values()}
    raw = {
        "base": {"seed": seed},
        "datasets": datasets or {k: {"source": "embedded", "kind": specs[k][0], "size": specs[k][1]} for k in used},
        "data": {"load_size": 36, "crop_size": 32, "flip": True, **(data or {})},
        "model": {"netG": "resnet_6blocks", "ngf": 4, "ndf": 4, "norm": "instance", **(model or {})},
        "train": {"epochs": 1, "epochs_decay": 1, "batch_size": 2, "snapshot_every": 0, "probe_images": 2,
                  "log_every": 1, **(train or {})},
        "mlflow": {"enabled": False, **(mlflow or {})},
        "tasks": tasks,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_init(params: Path, models: Path) -> None:
    from stages import init

    init.main(["--params", str(params), "--out", str(models / "init")])


def run_train(task: str, params: Path, models: Path, data: Path, metrics: Path) -> None:
    """The stage in this process (one process, no torchrun)."""
    from stages import train

    train.main([task, "--params", str(params), "--models", str(models), "--data", str(data), "--metrics", str(metrics)])


def uninterrupted_t1(tmp: Path, tasks: dict, **settings) -> tuple[Path, Path]:
    """Init + task t1 in this process on one thread (as every run it is compared with), in a fresh
    workspace under `tmp`; returns (data root, metrics root). `settings` go to `write_params`."""
    data = make_data(tmp, ["daynight"])
    params = write_params(tmp / "params.yaml", tasks, **settings)
    run_init(params, tmp / "models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the callers' single_thread fixture is function-scoped; module fixtures are not
    try:
        run_train("t1", params, tmp / "models", data, tmp / "metrics")
    finally:
        torch.set_num_threads(threads)
    return data, tmp / "metrics"


def stage_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DVC_ROOT", "DVC_STAGE"):
        env.pop(k, None)
    return env


def stage_cmd(task: str, params: Path, models: Path, data: Path, metrics: Path, nproc: int = 0) -> list[str]:
    """`python -m stages.train ...`, or under `torchrun --standalone --nproc_per_node=nproc` when nproc > 0."""
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [PY]
    return launcher + ["-m", "stages.train", task, "--params", str(params), "--models", str(models),
                       "--data", str(data), "--metrics", str(metrics)]


def run_cmd(cmd: list[str], tmp: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=tmp, env=stage_env(tmp), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def generators(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(ckpt / "generators.pt", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over two (nested) state dicts with the same keys and shapes."""
    assert a.keys() == b.keys()
    out = 0.0
    for k in a:
        if isinstance(a[k], dict):
            out = max(out, max_abs_diff(a[k], b[k]))
        else:
            assert a[k].shape == b[k].shape, k
            if a[k].numel():
                out = max(out, (a[k].double() - b[k].double()).abs().max().item())
    return out
