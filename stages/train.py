"""Stage train@<task>: learn one task on top of its predecessor's frozen checkpoint -> models/<task>/.

    python -m stages.train --nproc N <task> [--params params.yaml] [--models models]
        [--data data/prepared] [--metrics metrics]

Reads ``tasks.<task>`` (prev, dataset, mode, direction, per-task overrides), ``model``, ``train``,
``data``, ``base`` and ``mlflow`` from params.yaml; the path flags exist for tests only. Writes
models/<task>/ (tasks 1..t, probes), metrics/train/<task>.json and metrics/train/<task>.csv (rank 0).
A killed run leaves models/.snapshots/<task>/; running the stage again resumes from it.

With ``--nproc N`` (dvc.yaml) this process is a launcher: it runs ``torchrun --standalone
--nproc_per_node=N -m stages.train <task>`` as a child that dies with it, forwards SIGTERM / SIGINT, and
prints the stage's error as the last line, after torchrun's own output. Workers exit when torchrun dies;
one task has one trainer at a time (a lock beside its snapshot). Without ``--nproc`` it trains in this
process (as each torchrun worker does). Backend: NCCL on GPUs, gloo on
CPU, automatically. Several nodes (sharing the repository's file system): on node i run
``torchrun --nnodes=M --node_rank=i --nproc_per_node=G --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500
-m stages.train <task>``; the global batch is train.batch_size x M x G.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from piggyback import distributed as D
from piggyback import snapshot, supervise
from piggyback.checkpoint import CheckpointError
from piggyback.config import ConfigError, load_params, task_recipe
from piggyback.training import TaskPaths, train_task


MESSAGES = "PIGGYBACK_TRAIN_MESSAGES"   # folder where workers leave their one-line error for the launcher


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


def _launch(nproc: int, argv: list[str], task: str) -> None:
    """Launcher: torchrun as a child (dies with us), then its error, or ours, as the last line printed."""
    with tempfile.TemporaryDirectory(prefix="piggyback-train-") as messages:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "stages.train", *argv]
        supervise.set_parent_death_signal()   # dvc killed: stop too (torchrun and its workers follow)
        code = supervise.launch(cmd, env={**os.environ, MESSAGES: messages})
        if code == 0:
            return
        supervise.wait_for_workers()   # their last words come before ours
        lines = [p.read_text().strip() for p in sorted(Path(messages).glob("rank*.txt"))]
    how = f"stopped by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    print(next((line for line in lines if line), None)
          or f"train@{task}: training stopped ({how} of torchrun or one of its processes); "
             f"run `dvc repro train@{task}` again to resume from the last snapshot", file=sys.stderr, flush=True)
    _exit_now(1)


def _exit_now(code: int) -> None:
    """Exit without Python's teardown (torch's takes seconds on a loaded machine): used once nothing is
    left to write, so that a stopped stage is gone within a second or two of its signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fail(task: str, message: str, now: bool = False) -> None:
    """Exit with one line naming the task and what to do; under the launcher, hand the line to it too.
    `now`: without Python's teardown (see `_exit_now`)."""
    line = f"train@{task}: {message}"
    if os.environ.get(MESSAGES):
        with contextlib.suppress(OSError):   # the launcher may be gone already
            (Path(os.environ[MESSAGES]) / f"rank{D.get_rank()}.txt").write_text(line + "\n")
    if now:
        print(line, file=sys.stderr)
        _exit_now(1)
    D.cleanup(wait=False)   # a rank that failed alone must not wait for the others
    sys.exit(line)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.splitlines()[0])
    ap.add_argument("task", help="task id under `tasks:` in params.yaml")
    ap.add_argument("--nproc", type=int, default=0,
                    help="launch N processes with torchrun (as dvc.yaml does); 0: train in this process")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", default="models", help="checkpoint root (tests)")
    ap.add_argument("--data", default="data/prepared", help="prepared datasets root (tests)")
    ap.add_argument("--metrics", default="metrics", help="metrics root (tests)")
    args = ap.parse_args(argv)
    task, models = args.task, Path(args.models)
    if args.nproc > 0:
        _launch(args.nproc, [task, "--params", args.params, "--models", args.models, "--data", args.data,
                             "--metrics", args.metrics], task)
        return
    if "TORCHELASTIC_RUN_ID" in os.environ:
        supervise.die_with_launcher()   # torchrun's workers live in their own session: go when it goes
    with supervise.terminate_on_signals():
        _run(args, task, models)


def _run(args: argparse.Namespace, task: str, models: Path) -> None:
    """Train in this process; every error ends in `_fail`'s one line."""
    try:
        rank, local_rank, world, device = D.init_distributed()
        params = load_params(args.params)
        paths = _check_inputs(params, task, models, Path(args.data), Path(args.metrics))
        if rank == 0:
            snapshot.clear_finished(models)      # e.g. a task DVC restored from its run cache
        train_task(params, task, paths, device=device, local_rank=local_rank,
                   run_name=f"train:{task}")
    except (ConfigError, CheckpointError, StageError, snapshot.TrainerBusy, FileNotFoundError, ValueError) as e:
        _fail(task, str(e))
    except supervise.Terminated as e:   # a torchrun worker whose launcher is stopping leaves at once
        _fail(task, f"{e}; run `dvc repro train@{task}` again to resume from the last snapshot",
              now="TORCHELASTIC_RUN_ID" in os.environ)
    except Exception as e:  # noqa: BLE001 - anything else: its traceback, then the one line
        traceback.print_exc()
        _fail(task, f"{type(e).__name__}: {e} (the last snapshot is kept: fix the cause, then "
                    f"`dvc repro train@{task}` resumes from it)")
    D.cleanup()


if __name__ == "__main__":
    main()
