"""Training of one lifelong task (Piggyback GAN, Zhai et al. ECCV 2020) under torchrun / DDP.

`train_task` reads as labelled paragraphs, as stylegan2-ada's `training_loop`: set up (predecessor,
data, the task's `TrainState`, the MLflow run), resume (a snapshot of exactly these settings), the epoch
loop (the junyanz CycleGAN / pix2pix update of piggyback/models, logs, snapshots every K steps) and
finish (replicas checked, probes recorded, models/<task>/ and the metrics files written). Each network
is wrapped in its own DistributedDataParallel and called through it, so gradients are synchronised.
"""
from __future__ import annotations

import csv
import io
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from piggyback import distributed as D
from piggyback import models, probes, snapshot
from piggyback.checkpoint import check_compatible, load_lifelong, load_probes, read_meta, save_lifelong
from piggyback.config import Params, as_dict, dataset_data, task_recipe
from piggyback.fsutil import atomic_write_text, remove_stale_temps, sha256_file
from piggyback.layers import conv3x3_mode
from piggyback.losses import GANLoss
from piggyback.metricsfile import write_metrics
from piggyback.progress import progress_bar
from piggyback.trainstate import TrainState, mode_config
from piggyback.tracking import close_leftover_runs, default_tags, ended, flatten, open_run


def task_seed(params: Params, task_index: int) -> int:
    """Seed of task number `task_index` (0-based): tasks differ, reruns repeat."""
    return params.base.seed + 1000 * task_index


@dataclass(frozen=True)
class TaskPaths:
    """Where one task reads and writes (checked by the stage before training)."""
    prev: Path        # the predecessor's checkpoint, models/<prev>/
    data: Path        # the prepared dataset
    out: Path         # models/<task>/, written once at the end (must not exist)
    metrics: Path     # metrics root: train/<task>.json and train/<task>.csv
    models: Path      # checkpoint root: the snapshot lives in models/.snapshots/<task>/


class _SkipSampler(Sampler):
    """The sampler's indices for the current epoch minus the first `skip` (a resumed, half-done epoch)."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _remaining(loader: DataLoader, sampler: DistributedSampler, done: int) -> DataLoader:
    """`loader` without its first `done` batches, without loading them (same batches as before the kill)."""
    if done == 0:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=_SkipSampler(sampler, done * loader.batch_size),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last, generator=loader.generator)


def _grid(visuals: dict[str, torch.Tensor], names: tuple, n: int = 4) -> np.ndarray:
    """Rows real / fake / reconstructed (one per visual), first `n` images: uint8 (H, W, 3)."""
    from torchvision.utils import make_grid

    rows = [visuals[k][:n].detach().float().cpu() for k in names]
    grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=2, normalize=False, value_range=None)
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


class _Window:
    """Losses and time between two log points (MLflow every train.log_every steps)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.seconds, self.images = 0, 0.0, 0

    def add(self, losses: dict[str, torch.Tensor], seconds: float, images: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.steps, self.seconds, self.images = self.steps + 1, self.seconds + seconds, self.images + images

    def flush(self, device: torch.device) -> dict[str, float]:
        """Mean losses over the window and the ranks, and images/s; then start a new window (collective)."""
        means = D.all_reduce_mean({k: (v / self.steps).item() for k, v in self.sums.items()}, device)
        out = {**{f"loss/{k}": v for k, v in means.items()}, "images_per_s": self.images / max(self.seconds, 1e-9)}
        self.__init__()
        return out


@dataclass
class _Loop:
    """What the epoch loop uses besides the state: not saved, rebuilt identically on resume."""
    recipe: Any                   # piggyback.models.cyclegan | pix2pix
    mcfg: Any                     # train.cyclegan | train.pix2pix
    cfg: Any                      # train
    gan: GANLoss
    ddp: dict                     # the networks as called: DDP wrappers (or the networks alone)
    loader: DataLoader
    sampler: DistributedSampler
    total: int                    # steps of the whole task (max_steps or epochs x steps per epoch)
    total_epochs: int
    snaps: snapshot.Snapshots
    tracker: Any
    progress: Any                 # progress_bar(): a tqdm bar on a terminal, plain lines elsewhere


@dataclass
class _Inputs:
    """What a task trains from, loaded and checked before anything is written."""
    model: Any                    # LifelongModel: the predecessor's tasks, the new one added by TrainState.build
    loader: DataLoader
    sampler: DistributedSampler
    probe_inputs: dict            # fixed test inputs per generator (forgetting probes)
    prev_probes: dict             # earlier tasks' probes, carried into the new checkpoint
    seed: int


def train_task(params: Params, task: str, paths: TaskPaths, *, device: torch.device, local_rank: int = 0,
               run_name: Optional[str] = None) -> dict:
    """Train `task` on its predecessor, save models/<task>/ and the metrics files (rank 0); return the summary.

    Errors about the inputs (ConfigError, CheckpointError, ValueError, FileNotFoundError) are raised before
    anything is written; a second trainer of the task gets `snapshot.TrainerBusy`. Resumes from a
    snapshot of exactly these settings and clears it on success.
    """
    # Set up: the inputs, the task's lock and snapshot, its MLflow run (ended KILLED / FAILED on errors).
    recipe, cfg, rank, world = task_recipe(params, task), params.train, D.get_rank(), D.get_world_size()
    inputs = _load_inputs(params, task, paths)
    with snapshot.Snapshots(paths.models, task, _fingerprint(params, task, paths, world), world) as snaps:
        if rank == 0:
            remove_stale_temps(paths.models)   # what a killed writer left (this trainer holds the lock now)
        resume = snaps.load()
        with ended(_open_run(params, task, world, run_name, resume)) as tracker:
            state = TrainState.build(inputs.model, task, recipe, params, device, inputs.seed)
            ddp = D.wrap(state.nets, device, local_rank)

            # Resume: everything the state holds, this rank's part included; else log the parameter counts.
            if resume is not None:
                state.load_state_dict(resume)
                D.print0(f"Resuming {task} from snapshot at epoch {state.epoch + 1}, step {state.step}")
            else:
                tracker.log_metrics(state.parameter_counts(), step=0)

            # Epoch loop: the rest of each epoch, then its CSV row, sample grid and learning-rate decay.
            epochs, n = recipe.epochs + recipe.epochs_decay, len(inputs.loader)
            total = min(cfg.max_steps or epochs * n, epochs * n)
            mcfg = mode_config(cfg, recipe.mode)
            loop = _Loop(models.recipe(recipe.mode), mcfg, cfg, GANLoss(mcfg.gan_mode).to(device), ddp, inputs.loader,
                         inputs.sampler, total, epochs, snaps, tracker,
                         progress_bar(total, task, "it", enabled=rank == 0, initial=state.step, estimate_after=5))
            loop.progress.write(f"train@{task}: {recipe.mode} on {recipe.dataset}, {epochs} epochs x {n} steps "
                                f"(batch {cfg.batch_size} x {world} rank{'s' * (world > 1)}): {total} steps"
                                + (f", from step {state.step}" if state.step else "") + "; time left after 5 steps")
            with conv3x3_mode(cfg.conv3x3):     # train.conv3x3: the training steps only (not the probes)
                while state.epoch < epochs and state.step < total:
                    visuals = _train_epoch(state, loop)
                    _end_epoch(state, loop, visuals)
            loop.progress.close()

            # Finish: replicas agree, the task frozen, probes recorded; models/<task>/ and the metrics files.
            summary = _finish(state, inputs, task, params, paths, tracker, resumed=resume is not None)
            if rank == 0:
                snaps.clear()   # the task is done: only the final checkpoint remains
    return summary


def _load_inputs(params: Params, task: str, paths: TaskPaths) -> _Inputs:
    """The predecessor (checked against params), the task's data loader and its probe inputs."""
    from piggyback.data.datasets import build_loader, make_train_dataset

    recipe, cfg = task_recipe(params, task), params.train
    sizes = dataset_data(params, recipe.dataset)   # data.* with the dataset's own load_size / crop_size
    model = load_lifelong(paths.prev)
    check_compatible(model, params.model, cfg.method)
    seed = task_seed(params, len(model.tasks))
    train_set = make_train_dataset(paths.data, recipe.mode, recipe.direction, sizes, seed)
    loader, sampler = build_loader(train_set, cfg.batch_size, params.data.num_workers, seed=seed)
    probe_in = probes.probe_inputs(paths.data, recipe.mode, recipe.direction, sizes.crop_size, cfg.probe_images)
    return _Inputs(model, loader, sampler, probe_in, load_probes(paths.prev) or {}, seed)


def _open_run(params: Params, task: str, world: int, run_name: Optional[str], resume: Optional[dict]) -> Any:
    """The task's MLflow run: the snapshot's when resuming (no step logged twice), else a new one. Runs of
    this stage a SIGKILLed trainer left RUNNING are closed first (the caller holds the task's lock)."""
    rank, run_id = D.get_rank(), resume["run_id"] if resume else None
    tags = {**default_tags(task), "piggyback.stage": "train"}
    same_stage = {k: tags[k] for k in ("task", "piggyback.stage", "dvc.exp_name")}
    closed = close_leftover_runs(params.mlflow, rank, same_stage, keep=run_id)
    if closed:
        print(f"train@{task}: closed MLflow run(s) {', '.join(closed)} left RUNNING by a killed trainer (now KILLED)",
              flush=True)
    return open_run(params.mlflow, rank, run_name=run_name or f"train:{task}", tags=tags,
                    params=_tracked_params(params, task, world), run_id=run_id, resume=True)


def _train_epoch(state: TrainState, loop: _Loop) -> dict[str, torch.Tensor]:
    """The rest of the current epoch (from `state.done`): update, log, snapshot. Returns the last visuals."""
    cfg, world, device, steps_per_epoch = loop.cfg, D.get_world_size(), state.device, len(loop.loader)
    window, visuals = _Window(), {}
    loop.sampler.set_epoch(state.epoch)            # a new permutation per epoch
    loop.loader.dataset.set_epoch(state.epoch)     # per-sample crops / flips / partners of this epoch
    tools = models.StepTools(loop.gan, loop.mcfg, state.pools, state.precision, cfg.batch_calls)
    t_mark = time.perf_counter()
    for batch in _remaining(loop.loader, loop.sampler, state.done):
        real_A = batch["A"].to(device, non_blocking=True)
        real_B = batch["B"].to(device, non_blocking=True)
        if cfg.channels_last:
            real_A, real_B = (x.contiguous(memory_format=torch.channels_last) for x in (real_A, real_B))
        losses, visuals = loop.recipe.train_step(loop.ddp, state.optimizers, real_A, real_B, tools)
        dt, images = time.perf_counter() - t_mark, real_A.shape[0] * world
        state.record_step(losses, dt, images)
        window.add(losses, dt, images)
        loop.progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == loop.total:
            logged = window.flush(device)
            loop.tracker.log_metrics(logged, step=state.step)
            loop.progress.set_postfix({**{k: f"{logged['loss/' + k]:.3f}" for k in ("G", "D_A", "D_B", "D")
                                          if "loss/" + k in logged}, "img/s": f"{logged['images_per_s']:.1f}"})

        # Snapshot every K steps and at each epoch's end, but not after the last step (saving follows).
        if state.step < loop.total and ((cfg.snapshot_every and state.step % cfg.snapshot_every == 0)
                                        or state.done == steps_per_epoch):
            loop.snaps.save(state, loop.tracker.run_id)
        t_mark = time.perf_counter()
        if state.step >= loop.total:
            break
    return visuals


def _end_epoch(state: TrainState, loop: _Loop, visuals: dict[str, torch.Tensor]) -> None:
    """One CSV row (losses averaged over the epoch and the ranks), a sample grid, a progress line, lr decay."""
    row = {"epoch": state.epoch + 1, "step": state.step,
           **D.all_reduce_mean({k: (v / max(state.done, 1)).item() for k, v in state.sums.items()}, state.device),
           "lr": state.optimizers["G"].param_groups[0]["lr"],
           "images_per_s": state.timer["epoch_images"] / max(state.timer["epoch_s"], 1e-9)}
    state.history.append(row)
    loop.tracker.log_metrics({"lr": row["lr"], "epoch": row["epoch"], "epoch_images_per_s": row["images_per_s"],
                              **{f"epoch_loss/{k}": row[k] for k in state.sums}}, step=state.step)
    if visuals and loop.tracker.run_id is not None:
        loop.tracker.log_image(_grid(visuals, loop.recipe.VISUALS), f"samples/epoch_{state.epoch + 1:03d}.png")
    loop.progress.write(f"{loop.progress.desc}: epoch {state.epoch + 1}/{loop.total_epochs} step {state.step} "
                      + " ".join(f"{k} {row[k]:.3f}" for k in state.sums) + f" {row['images_per_s']:.1f} img/s")
    state.next_epoch()


def _finish(state: TrainState, inputs: _Inputs, task: str, params: Params, paths: TaskPaths, tracker: Any,
            resumed: bool) -> dict:
    """Check the replicas, freeze the task, record probes; rank 0 writes models/<task>/ and the metrics files."""
    recipe, cfg, rank, world = task_recipe(params, task), params.train, D.get_rank(), D.get_world_size()
    model, seed = inputs.model, inputs.seed
    G = state.generators()
    D.average_running_stats(G.values())       # the current task's BatchNorm statistics, all shards
    replicas_agree = D.check_replicas_agree(state.nets)   # raises when they differ
    history = state.history
    summary = {
        "task": task, "mode": recipe.mode, "dataset": recipe.dataset, "direction": recipe.direction,
        "epochs": state.epoch, "steps": state.step, "world_size": world, "global_batch": cfg.batch_size * world,
        "images_per_s": state.timer["train_s"] and state.step * cfg.batch_size * world / state.timer["train_s"],
        "wall_time_s": state.wall_time(), "resumed": resumed, "replicas_agree": replicas_agree,
        "final_losses": {k: v for k, v in history[-1].items() if k not in ("epoch", "step", "lr", "images_per_s")}
        if history else {},
        "mlflow_run_id": tracker.run_id,
    }
    record = model.finish_task(mlflow_run_id=tracker.run_id, train={
        "recipe": as_dict(recipe), "steps": state.step, "epochs_done": state.epoch, "world_size": world, "seed": seed})
    summary["params"] = {k: record[k] for k in ("new_params", "stored_params", "separate_params")}
    if rank == 0:
        task_probes = probes.record_probes(model, task, inputs.probe_inputs)
        record["probe_sha256"] = {w: p["sha256"] for w, p in task_probes.items()}
        # models/<task>/ holds tasks 1..t and every task's probes (earlier ones carried forward).
        save_lifelong(model, paths.out, probes={**inputs.prev_probes, task: task_probes},
                      extra_meta={"trained_task": task, "world_size": world, "seed": seed})
        tracker.log_metrics({f"params/{k}": v for k, v in summary["params"].items()}, step=state.step)
        tracker.log_dict(record, "task_record.json")
        for path in _write_metrics(paths.metrics, task, summary, history):
            tracker.log_artifact(path, "metrics")
        print(f"train@{task}: {state.step} steps, {summary['images_per_s']:.1f} img/s, "
              f"{summary['wall_time_s']:.1f} s -> {paths.out}", flush=True)
    return summary


def _fingerprint(params: Params, task: str, paths: TaskPaths, world: int) -> str:
    """What the trajectory depends on: a snapshot with another fingerprint is stale."""
    manifest = paths.data / "manifest.json"
    return snapshot.fingerprint({
        "params": {k: as_dict(getattr(params, k)) for k in ("base", "model", "train", "data")},
        "sizes": as_dict(dataset_data(params, params.tasks[task].dataset)), "task": as_dict(params.tasks[task]), "prev": read_meta(paths.prev)["files"], "world_size": world,
        "data": sha256_file(manifest) if manifest.is_file() else None})


def _tracked_params(params: Params, task: str, world: int) -> dict:
    """The MLflow params of a task's run: its recipe, the sections it reads (flattened), the world size."""
    recipe = as_dict(task_recipe(params, task))
    recipe.pop("task")
    sizes = dataset_data(params, params.tasks[task].dataset)
    data = {k: getattr(sizes, k) for k in ("load_size", "crop_size", "flip", "num_workers")}
    return {**recipe, "prev": params.tasks[task].prev, "world_size": world,
            "global_batch_size": params.train.batch_size * world,
            **flatten({"train": as_dict(params.train), "model": as_dict(params.model), "data": data,
                       "base": as_dict(params.base)})}


def _write_metrics(metrics: Path, task: str, summary: dict, history: list[dict]) -> tuple[Path, Path]:
    """metrics/train/<task>.json (the summary) and metrics/train/<task>.csv (one row per epoch)."""
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
