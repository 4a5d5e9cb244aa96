"""Training of one lifelong task (Piggyback GAN, Zhai et al. ECCV 2020) under torchrun / DDP.

One explicit function in labelled paragraphs, as stylegan2-ada `training_loop`: build the task's
networks, wrap each in its own DistributedDataParallel (and call them through it, so gradients are
synchronised: bug B4 of the public code), resume from a snapshot, train with the junyanz CycleGAN /
pix2pix recipe (piggyback/models), snapshot every K iterations, record forgetting probes, save.
"""
from __future__ import annotations

import itertools
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from piggyback import distributed as D
from piggyback import models, probes, snapshot
from piggyback.checkpoint import save_lifelong
from piggyback.config import Params, as_dict, task_recipe
from piggyback.discriminators import build_discriminator
from piggyback.lifelong import LifelongModel, task_parameters
from piggyback.losses import GANLoss


def task_seed(params: Params, task_index: int) -> int:
    """Seed of task number `task_index` (0-based): tasks differ, reruns repeat."""
    return params.base.seed + 1000 * task_index


def lr_lambda(epochs: int, epochs_decay: int):
    """junyanz 'linear' policy: constant for `epochs`, then linear decay over `epochs_decay` (never 0)."""
    return lambda epoch: 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


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


def train_task(
    params: Params,                            # Validated params.yaml (hyperparameters come only from here).
    task: str,                                 # Task id under `tasks:`.
    model: LifelongModel,                      # Predecessor's model (tasks 1..t-1), on the CPU.
    loader: DataLoader,                        # From data.datasets.build_loader (DistributedSampler inside).
    sampler: DistributedSampler,               # The loader's sampler (set_epoch every epoch).
    probe_inputs: dict[str, torch.Tensor],     # {"G_A": (k, C, H, W)[, "G_B": ...]} fixed test inputs.
    tracker: Any,                              # tracking.Tracker on rank 0, NullTracker elsewhere.
    *,
    device: torch.device,
    out_dir: Optional[Path],                   # models/<task>/ (written by rank 0); None: do not save.
    snapshot_dir: Path,                        # models/.snapshots/<task>/
    resume: Optional[dict] = None,             # A loaded snapshot of this very run, or None.
    prev_probes: Optional[dict] = None,        # Earlier tasks' probes, carried into the new checkpoint.
    fingerprint: str = "",                     # Identifies the settings; stored in snapshots.
    local_rank: int = 0,
) -> dict:
    """Train `task` on top of `model`, save models/<task>/ (rank 0); return the summary and epoch rows."""
    recipe, cfg, mc = task_recipe(params, task), params.train, params.model
    R = models.recipe(recipe.mode)
    mcfg = cfg.cyclegan if recipe.mode == "cyclegan" else cfg.pix2pix
    rank, world = D.get_rank(), D.get_world_size()
    seed = task_seed(params, len(model.tasks))
    total_epochs = recipe.epochs + recipe.epochs_decay
    steps_per_epoch = len(loader)
    wall0 = time.perf_counter()

    # Build networks. Same seed on every rank, so replicas start equal (DDP broadcasts rank 0's anyway).
    torch.manual_seed(seed)
    G = model.add_task(task, recipe.mode, recipe.direction, recipe.dataset, recipe.lam)
    d_in = {"D_A": mc.output_nc, "D_B": mc.input_nc} if recipe.mode == "cyclegan" else {"D_A": mc.input_nc + mc.output_nc}
    Ds = {k: build_discriminator(mc.netD, d_in[k], mc.ndf, mc.n_layers_D, mc.norm) for k in R.DISCRIMINATORS}
    model.to(device)
    nets = {**G, **{k: d.to(device) for k, d in Ds.items()}}
    if cfg.channels_last:
        for n in nets.values():
            n.to(memory_format=torch.channels_last)
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **models.adam_options(cfg.adam_impl))
    opt = {"G": torch.optim.Adam([p for g in G.values() for p in task_parameters(g)], **adam),  # this task's tensors only
           "D": torch.optim.Adam([p for d in Ds.values() for p in d.parameters()], **adam)}
    sched = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(recipe.epochs, recipe.epochs_decay)) for k, o in opt.items()}
    prec = models.Precision(cfg.amp, device)
    gan = GANLoss(mcfg.gan_mode).to(device)
    pools = R.make_pools(mcfg, seed + 100 * rank)   # each rank pools its own fakes
    torch.manual_seed(seed + rank)                  # from here on ranks draw differently (dropout)
    counts = {"params/G_trainable": sum(p.numel() for g in G.values() for p in task_parameters(g)),
              "params/D": sum(p.numel() for d in Ds.values() for p in d.parameters())}

    # Wrap in DDP: one wrapper per network, always called through the wrapper in train_step.
    if D.is_distributed():
        ids = [local_rank] if device.type == "cuda" else None
        with warnings.catch_warnings():   # torch 2.14 deprecates the name; its replacement still syncs at init
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
            # Buffers are not broadcast: the frozen bank is buffers, and copying it every forward would cost
            # a whole model per earlier task. BatchNorm statistics are averaged over ranks at the end instead.
            ddp = {k: DistributedDataParallel(n, device_ids=ids, broadcast_buffers=False) for k, n in nets.items()}
    else:
        ddp = dict(nets)

    # Resume: networks, optimisers, schedulers, scaler, counters, then this rank's pools, sums and RNG.
    epoch = done = step = 0
    history: list[dict] = []
    sums: dict[str, torch.Tensor] = {}
    timer = {"train_s": 0.0, "epoch_s": 0.0, "epoch_images": 0, "wall_s": 0.0}
    if resume is not None:
        for k, n in nets.items():
            n.load_state_dict(resume["nets"][k])
        for k in opt:
            opt[k].load_state_dict(resume["optimizers"][k])
            sched[k].load_state_dict(resume["schedulers"][k])
        prec.load_state_dict(resume["scaler"])
        epoch, done, step, history, timer = resume["epoch"], resume["done"], resume["step"], resume["history"], resume["timer"]
        mine = resume["ranks"][rank]
        for k, pool in pools.items():
            pool.load_state_dict(mine["pools"][k], device)
        sums = {k: v.to(device) for k, v in mine["sums"].items()}
        snapshot.restore_rng(mine["rng"], device)
        D.print0(f"Resuming {task} from snapshot at epoch {epoch + 1}, step {step}")
    else:
        tracker.log_metrics(counts, step=0)

    # Train.
    max_steps = cfg.max_steps or total_epochs * steps_per_epoch
    total = min(max_steps, total_epochs * steps_per_epoch)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc=task, unit="it", dynamic_ncols=True,
               disable=not (rank == 0 and sys.stderr.isatty()))
    window: dict[str, torch.Tensor] = {}
    win_n, win_t = 0, 0.0
    visuals: dict[str, torch.Tensor] = {}
    t_mark = time.perf_counter()
    while epoch < total_epochs and step < max_steps:
        sampler.set_epoch(epoch)            # a new permutation per epoch (bug B5 of the public code)
        loader.dataset.set_epoch(epoch)     # per-sample crops / flips / partners of this epoch
        for batch in _remaining(loader, sampler, done):
            real_A = batch["A"].to(device, non_blocking=True)
            real_B = batch["B"].to(device, non_blocking=True)
            if cfg.channels_last:
                real_A, real_B = (x.contiguous(memory_format=torch.channels_last) for x in (real_A, real_B))
            losses, visuals = R.train_step(ddp, opt, real_A, real_B, gan, mcfg, pools, prec, cfg.batch_calls)
            step, done = step + 1, done + 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v
                window[k] = window.get(k, 0) + v
            dt = time.perf_counter() - t_mark
            timer["train_s"] += dt
            timer["epoch_s"] += dt
            timer["epoch_images"] += real_A.shape[0] * world
            win_n, win_t = win_n + 1, win_t + dt
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                logged = D.all_reduce_mean({k: (v / win_n).item() for k, v in window.items()}, device)
                ips = win_n * real_A.shape[0] * world / max(win_t, 1e-9)
                tracker.log_metrics({**{f"loss/{k}": v for k, v in logged.items()}, "images_per_s": ips}, step=step)
                bar.set_postfix({"epoch": f"{epoch + 1}/{total_epochs}", "img/s": f"{ips:.1f}",
                                 **{k: f"{logged[k]:.3f}" for k in ("G", "D_A", "D_B", "D") if k in logged}})
                window, win_n, win_t = {}, 0, 0.0

            # Snapshot every K iterations and at each epoch's end (not after the last step: saving follows).
            last = step >= max_steps or (epoch == total_epochs - 1 and done == steps_per_epoch)
            if not last and ((cfg.snapshot_every and step % cfg.snapshot_every == 0) or done == steps_per_epoch):
                local = {"rng": snapshot.capture_rng(device), "pools": {k: p.state_dict() for k, p in pools.items()},
                         "sums": dict(sums)}
                ranks = snapshot.gather_to_rank0(snapshot.to_cpu(local))
                if rank == 0:
                    snapshot.save(snapshot_dir, {
                        "task": task, "fingerprint": fingerprint, "world_size": world, "run_id": tracker.run_id,
                        "epoch": epoch, "done": done, "step": step, "history": history,
                        "timer": {**timer, "wall_s": timer["wall_s"] + time.perf_counter() - wall0},
                        "nets": {k: n.state_dict() for k, n in nets.items()},
                        "optimizers": {k: o.state_dict() for k, o in opt.items()},
                        "schedulers": {k: s.state_dict() for k, s in sched.items()},
                        "scaler": prec.state_dict(), "ranks": ranks})
            t_mark = time.perf_counter()
            if step >= max_steps:
                break

        # End of epoch: one CSV row (losses averaged over the epoch and the ranks), a sample grid, lr decay.
        n_done = max(done, 1)
        row = {"epoch": epoch + 1, "step": step,
               **D.all_reduce_mean({k: (v / n_done).item() for k, v in sums.items()}, device),
               "lr": opt["G"].param_groups[0]["lr"],
               "images_per_s": timer["epoch_images"] / max(timer["epoch_s"], 1e-9)}
        history.append(row)
        tracker.log_metrics({"lr": row["lr"], "epoch": row["epoch"], "epoch_images_per_s": row["images_per_s"],
                             **{f"epoch_loss/{k}": row[k] for k in sums}}, step=step)
        if visuals and tracker.run_id is not None:
            tracker.log_image(_grid(visuals, R.VISUALS), f"samples/epoch_{epoch + 1:03d}.png")
        if rank == 0 and bar.disable:
            print(f"{task}: epoch {epoch + 1}/{total_epochs} step {step} "
                  + " ".join(f"{k} {row[k]:.3f}" for k in sums) + f" {row['images_per_s']:.1f} img/s", flush=True)
        with warnings.catch_warnings():   # a run resumed at an epoch's end steps no optimiser before this
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for s in sched.values():
                s.step()
        epoch, done, sums = epoch + 1, 0, {}
        timer.update(epoch_s=0.0, epoch_images=0)
        t_mark = time.perf_counter()
    bar.close()

    # Probe: replicas must agree; freeze the task; record fixed inputs and the frozen network's outputs.
    D.average_running_stats(G.values())                  # the current task's BatchNorm statistics, all shards
    replicas_agree = D.check_replicas_agree({**G, **Ds})   # raises when they differ
    summary = {
        "task": task, "mode": recipe.mode, "dataset": recipe.dataset, "direction": recipe.direction,
        "epochs": epoch, "steps": step, "world_size": world, "global_batch": cfg.batch_size * world,
        "images_per_s": timer["train_s"] and step * cfg.batch_size * world / timer["train_s"],
        "wall_time_s": timer["wall_s"] + time.perf_counter() - wall0, "resumed": resume is not None, "replicas_agree": replicas_agree,
        "final_losses": {k: v for k, v in history[-1].items() if k not in ("epoch", "step", "lr", "images_per_s")}
        if history else {},
        "mlflow_run_id": tracker.run_id,
    }
    record = model.finish_task(mlflow_run_id=tracker.run_id, train={
        "recipe": as_dict(recipe), "steps": step, "epochs_done": epoch, "world_size": world, "seed": seed})
    summary["params"] = {k: record[k] for k in ("new_params", "stored_params", "separate_params")}
    if rank == 0:
        task_probes = probes.record_probes(model, task, probe_inputs)
        record["probe_sha256"] = {w: p["sha256"] for w, p in task_probes.items()}

        # Save: models/<task>/ with tasks 1..t and every task's probes (earlier ones carried forward).
        if out_dir is not None:
            save_lifelong(model, out_dir, probes={**(prev_probes or {}), task: task_probes},
                          extra_meta={"trained_task": task, "world_size": world, "seed": seed})
        tracker.log_metrics({f"params/{k}": v for k, v in summary["params"].items()}, step=step)
        tracker.log_dict(record, "task_record.json")
    summary["history"] = history
    return summary
