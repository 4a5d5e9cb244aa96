"""Stage train@<task>: learn one task on top of its predecessor's frozen checkpoint -> models/<task>/.

    torchrun --standalone --nproc_per_node=N -m stages.train <task> [--params params.yaml]
        [--models models] [--data data/prepared] [--metrics metrics]

Reads ``tasks.<task>`` (prev, dataset, mode, direction, per-task overrides), ``model``, ``train``,
``data``, ``base`` and ``mlflow`` from params.yaml; the path flags exist for tests only. Writes
models/<task>/ (tasks 1..t, probes), metrics/train/<task>.json and metrics/train/<task>.csv (rank 0).
A killed run leaves models/.snapshots/<task>/; running the stage again resumes from it.

Without torchrun (``python -m stages.train t1``) it runs as one process. Backend: NCCL on GPUs, gloo on
CPU, automatically. Several nodes (sharing the repository's file system): on node i run
``torchrun --nnodes=M --node_rank=i --nproc_per_node=G --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500
-m stages.train <task>``; the global batch is train.batch_size x M x G.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from piggyback import distributed as D
from piggyback.checkpoint import CheckpointError
from piggyback.config import ConfigError, load_params, task_recipe
from piggyback.training import TaskPaths, train_task


class StageError(RuntimeError):
    """A missing or conflicting input/output, detected before training starts."""


def _check_inputs(params, task: str, models: Path, data: Path, metrics: Path) -> TaskPaths:
    """The task's paths, or a StageError naming what to run."""
    recipe, prev = task_recipe(params, task), params.tasks[task].prev
    paths = TaskPaths(prev=models / prev, data=data / recipe.dataset, out=models / task, metrics=metrics, models=models)
    if not (paths.prev / "meta.json").is_file():
        stage = "init" if prev == "init" else f"train@{prev}"
        raise StageError(f"{paths.prev} not found: run `dvc repro {stage}` first")
    if not paths.data.is_dir():
        raise StageError(f"{paths.data} not found: run `dvc repro prepare@{recipe.dataset}`")
    if paths.out.exists():
        raise StageError(f"{paths.out} already exists: a finished task is never overwritten "
                         "(dvc repro deletes it before re-running; outside DVC delete it yourself)")
    m, c = params.model, params.train.cyclegan
    if recipe.mode == "cyclegan" and c.lambda_identity > 0 and m.input_nc != m.output_nc:
        raise ConfigError(f"train.cyclegan.lambda_identity: identity loss needs model.input_nc == model.output_nc "
                          f"({m.input_nc} != {m.output_nc}); set it to 0")
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="torchrun ... -m stages.train", description=__doc__.splitlines()[0])
    ap.add_argument("task", help="task id under `tasks:` in params.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", default="models", help="checkpoint root (tests)")
    ap.add_argument("--data", default="data/prepared", help="prepared datasets root (tests)")
    ap.add_argument("--metrics", default="metrics", help="metrics root (tests)")
    args = ap.parse_args(argv)
    task = args.task
    rank, local_rank, world, device = D.init_distributed()
    try:
        params = load_params(args.params)
        paths = _check_inputs(params, task, Path(args.models), Path(args.data), Path(args.metrics))
        train_task(params, task, paths, device=device, local_rank=local_rank,
                   run_name=os.environ.get("DVC_STAGE") or f"train@{task}")
    except (ConfigError, CheckpointError, StageError, FileNotFoundError, ValueError) as e:
        D.cleanup(wait=False)   # every rank reads the same files, so every rank fails here
        sys.exit(f"train@{task}: {e}")
    D.cleanup()


if __name__ == "__main__":
    main()
