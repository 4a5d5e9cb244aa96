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
import csv
import io
import os
import sys
from pathlib import Path

from piggyback import distributed as D
from piggyback import probes, snapshot
from piggyback.checkpoint import CheckpointError, check_compatible, load_lifelong, load_probes, read_meta
from piggyback.config import ConfigError, as_dict, dataset_data, load_params, task_recipe
from piggyback.fsutil import atomic_write_text, sha256_file
from piggyback.metricsfile import write_metrics
from piggyback.tracking import NullTracker, default_tags, flatten, open_run


class StageError(RuntimeError):
    """A missing or conflicting input/output, detected before training starts."""


def _check_inputs(params, task: str, models: Path, data: Path) -> tuple[Path, Path, Path]:
    """(predecessor folder, prepared dataset, output folder), or a StageError naming what to run."""
    recipe, prev = task_recipe(params, task), params.tasks[task].prev
    prev_dir, data_dir, out_dir = models / prev, data / recipe.dataset, models / task
    if not (prev_dir / "meta.json").is_file():
        stage = "init" if prev == "init" else f"train@{prev}"
        raise StageError(f"{prev_dir} not found: run `dvc repro {stage}` first")
    if not data_dir.is_dir():
        raise StageError(f"{data_dir} not found: run `dvc repro prepare@{recipe.dataset}`")
    if out_dir.exists():
        raise StageError(f"{out_dir} already exists: a finished task is never overwritten "
                         "(dvc repro deletes it before re-running; outside DVC delete it yourself)")
    m, c = params.model, params.train.cyclegan
    if recipe.mode == "cyclegan" and c.lambda_identity > 0 and m.input_nc != m.output_nc:
        raise ConfigError(f"train.cyclegan.lambda_identity: identity loss needs model.input_nc == model.output_nc "
                          f"({m.input_nc} != {m.output_nc}); set it to 0")
    return prev_dir, data_dir, out_dir


def _tracked_params(params, task: str, world: int) -> dict:
    recipe = as_dict(task_recipe(params, task))
    recipe.pop("task")
    sizes = dataset_data(params, params.tasks[task].dataset)
    data = {k: getattr(sizes, k) for k in ("load_size", "crop_size", "flip", "num_workers")}
    return {**recipe, "prev": params.tasks[task].prev, "world_size": world,
            "global_batch_size": params.train.batch_size * world,
            **flatten({"train": as_dict(params.train), "model": as_dict(params.model), "data": data,
                       "base": as_dict(params.base)})}


def _write_metrics(metrics: Path, task: str, summary: dict) -> tuple[Path, Path]:
    history = summary.pop("history")
    json_path = write_metrics(metrics, f"train/{task}.json", summary)   # text in metrics/info/train/
    csv_path = metrics / "train" / f"{task}.csv"
    cols = ["epoch", "step"] + sorted({k for r in history for k in r} - {"epoch", "step", "lr", "images_per_s"}) \
        + ["lr", "images_per_s"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="torchrun ... -m stages.train", description=__doc__.splitlines()[0])
    ap.add_argument("task", help="task id under `tasks:` in params.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", default="models", help="checkpoint root (tests)")
    ap.add_argument("--data", default="data/prepared", help="prepared datasets root (tests)")
    ap.add_argument("--metrics", default="metrics", help="metrics root (tests)")
    args = ap.parse_args(argv)
    models, task = Path(args.models), args.task
    rank, local_rank, world, device = D.init_distributed()
    try:
        setup = _setup(args, task, models, world)
    except (ConfigError, CheckpointError, StageError, FileNotFoundError, ValueError) as e:
        D.cleanup(wait=False)   # every rank reads the same files, so every rank fails here
        sys.exit(f"train@{task}: {e}")
    params, resume = setup["params"], setup["resume"]
    tracker, ok = NullTracker(), False
    try:
        tracker = open_run(params.mlflow, rank, run_name=os.environ.get("DVC_STAGE") or f"train@{task}",
                           tags=default_tags(task), params=_tracked_params(params, task, world),
                           run_id=resume["run_id"] if resume else None)
        from piggyback.training import train_task

        summary = train_task(params, task, setup["model"], setup["loader"], setup["sampler"], setup["inputs"],
                             tracker, device=device, out_dir=setup["out_dir"], snapshot_dir=setup["snap_dir"],
                             resume=resume, prev_probes=setup["prev_probes"], fingerprint=setup["fingerprint"],
                             local_rank=local_rank)
        if rank == 0:
            for path in _write_metrics(Path(args.metrics), task, summary):
                tracker.log_artifact(path, "metrics")
            snapshot.clear(setup["snap_dir"])   # the task is done: only the final checkpoint remains
            print(f"train@{task}: {summary['steps']} steps, {summary['images_per_s']:.1f} img/s, "
                  f"{summary['wall_time_s']:.1f} s -> {setup['out_dir']}", flush=True)
        ok = True
    finally:
        tracker.end("FINISHED" if ok else "FAILED")
    D.cleanup()


def _setup(args, task: str, models: Path, world: int) -> dict:
    """Everything checked and loaded before the first step: params, predecessor, architecture, data, output."""
    params = load_params(args.params)
    prev_dir, data_dir, out_dir = _check_inputs(params, task, models, Path(args.data))
    model = load_lifelong(prev_dir)
    check_compatible(model, params.model, params.train.method)
    recipe = task_recipe(params, task)
    from piggyback.data.datasets import build_loader, make_train_dataset
    from piggyback.training import task_seed

    seed = task_seed(params, len(model.tasks))
    sizes = dataset_data(params, recipe.dataset)   # data.* with the dataset's own load_size / crop_size
    train_set = make_train_dataset(data_dir, recipe.mode, recipe.direction, sizes, seed)
    loader, sampler = build_loader(train_set, params.train.batch_size, params.data.num_workers, seed=seed)
    inputs = probes.probe_inputs(data_dir, recipe.mode, recipe.direction, sizes.crop_size,
                                 params.train.probe_images)

    # A snapshot of exactly these settings resumes the run; any other is stale and ignored.
    manifest = data_dir / "manifest.json"
    fp = snapshot.fingerprint({
        "params": {k: as_dict(getattr(params, k)) for k in ("base", "model", "train", "data")}, "sizes": as_dict(sizes),
        "task": as_dict(params.tasks[task]), "prev": read_meta(prev_dir)["files"], "world_size": world,
        "data": sha256_file(manifest) if manifest.is_file() else None})
    snap_dir = snapshot.snapshot_dir(models, task)
    resume = snapshot.load(snap_dir)
    if resume is not None and (resume["fingerprint"] != fp or resume["world_size"] != world):
        D.print0(f"Ignoring the snapshot in {snap_dir}: it was written with other params, data or world size")
        resume = None
    return {"params": params, "model": model, "loader": loader, "sampler": sampler, "inputs": inputs,
            "out_dir": out_dir, "snap_dir": snap_dir, "resume": resume, "fingerprint": fp,
            "prev_probes": load_probes(prev_dir)}


if __name__ == "__main__":
    main()
