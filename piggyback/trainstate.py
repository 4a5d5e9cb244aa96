"""Everything one task's training carries from step to step, as one object that saves and restores itself.

`TrainState` holds the networks, optimisers, schedulers, AMP scaler, counters, epoch history and timings
(the same on every rank) and, per rank, the image pools, the epoch's loss sums and the RNG states. Its
`state_dict()` is what a snapshot stores (piggyback/snapshot.py); `load_state_dict()` puts a run back
exactly where it stopped, so a resumed run takes the same steps as an uninterrupted one.
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from piggyback import models
from piggyback import distributed as D
from piggyback.config import Params, TaskRecipe
from piggyback.discriminators import build_discriminator
from piggyback.convkernels import set_conv_kernels
from piggyback.lifelong import LifelongModel, task_parameters
from piggyback.losses import ImagePool
from piggyback.snapshot import to_cpu


def lr_lambda(epochs: int, epochs_decay: int):
    """junyanz 'linear' policy: constant for `epochs`, then linear decay over `epochs_decay` (never 0)."""
    return lambda epoch: 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


def mode_config(train_cfg: Any, mode: str) -> Any:
    """The recipe settings of `mode`: train.cyclegan or train.pix2pix."""
    return train_cfg.cyclegan if mode == "cyclegan" else train_cfg.pix2pix


def capture_rng(device: torch.device) -> dict:
    """This process's torch / Python (and CUDA) RNG states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainState:
    nets: dict[str, nn.Module]                          # G_A[, G_B] (views of the lifelong model) and D_*
    optimizers: dict[str, torch.optim.Optimizer]        # "G": this task's tensors only; "D"
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    precision: models.Precision                         # autocast + GradScaler (fp16)
    pools: dict[str, ImagePool]                         # this rank's pools of fakes
    device: torch.device
    epoch: int = 0                                      # 0-based epoch in progress
    done: int = 0                                       # batches of that epoch already trained
    step: int = 0                                       # global step (batches since the task started)
    history: list[dict] = field(default_factory=list)  # one row per finished epoch (the CSV)
    sums: dict[str, Tensor] = field(default_factory=dict)   # this rank's loss sums over the epoch
    timer: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "epoch_s": 0.0, "epoch_images": 0,
                                                             "wall_s": 0.0})
    started: float = field(default_factory=time.perf_counter)   # this process's start (wall_s is earlier runs')

    @classmethod
    def build(cls, model: LifelongModel, task: str, recipe: TaskRecipe, params: Params, device: torch.device,
              seed: int) -> "TrainState":
        """Add `task` to `model` and build its discriminators, optimisers and pools from `seed`.

        Every rank seeds alike, so replicas start equal; afterwards each rank reseeds with its rank so
        that dropout and the pools draw differently per shard.
        """
        cfg, mc, rank = params.train, params.model, D.get_rank()
        R = models.recipe(recipe.mode)
        torch.manual_seed(seed)
        G = model.add_task(task, recipe.mode, recipe.direction, recipe.dataset, recipe.lam)
        d_in = ({"D_A": mc.output_nc, "D_B": mc.input_nc} if recipe.mode == "cyclegan"
                else {"D_A": mc.input_nc + mc.output_nc})
        Ds = {k: build_discriminator(mc.netD, d_in[k], mc.ndf, mc.n_layers_D, mc.norm) for k in R.DISCRIMINATORS}
        model.to(device)
        nets = {**G, **{k: d.to(device) for k, d in Ds.items()}}
        if cfg.channels_last:
            for n in nets.values():
                n.to(memory_format=torch.channels_last)
        for n in nets.values():
            set_conv_kernels(n, cfg.conv_kernels)
        groups = {"G": [p for g in G.values() for p in task_parameters(g)],
                  "D": [p for d in Ds.values() for p in d.parameters()]}
        opt = {k: torch.optim.Adam(ps, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **models.adam_options(cfg.adam_impl, ps))
               for k, ps in groups.items()}
        sched = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(recipe.epochs, recipe.epochs_decay))
                 for k, o in opt.items()}
        prec = models.Precision(cfg.amp, device)
        pools = R.make_pools(mode_config(cfg, recipe.mode), seed + 100 * rank)   # each rank pools its own fakes
        torch.manual_seed(seed + rank)                             # from here on ranks draw differently
        return cls(nets, opt, sched, prec, pools, device)

    def generators(self) -> dict[str, nn.Module]:
        return {k: n for k, n in self.nets.items() if k.startswith("G_")}

    def parameter_counts(self) -> dict[str, int]:
        """Trainable tensors of this task: the generators' own share and the discriminators."""
        return {"params/G_trainable": sum(p.numel() for g in self.generators().values() for p in task_parameters(g)),
                "params/D": sum(p.numel() for k, d in self.nets.items() if k.startswith("D_") for p in d.parameters())}

    def wall_time(self) -> float:
        """Seconds spent on this task so far, over every run of it."""
        return self.timer["wall_s"] + time.perf_counter() - self.started

    def record_step(self, losses: dict[str, Tensor], seconds: float, images: int) -> None:
        """Count one finished step: counters, the epoch's loss sums and its timing."""
        self.step, self.done = self.step + 1, self.done + 1
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.timer["train_s"] += seconds
        self.timer["epoch_s"] += seconds
        self.timer["epoch_images"] += images

    def next_epoch(self) -> None:
        """Decay the learning rate and start the next epoch's counters and sums."""
        with warnings.catch_warnings():   # a run resumed at an epoch's end steps no optimiser before this
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for s in self.schedulers.values():
                s.step()
        self.epoch, self.done, self.sums = self.epoch + 1, 0, {}
        self.timer.update(epoch_s=0.0, epoch_images=0)

    def state_dict(self) -> Optional[dict]:
        """The whole state on rank 0 (None on other ranks). Collective: every rank must call it."""
        local = to_cpu({"rng": capture_rng(self.device), "pools": {k: p.state_dict() for k, p in self.pools.items()},
                         "sums": dict(self.sums)})
        ranks = D.gather_to_rank0(local)
        if ranks is None:
            return None
        return to_cpu({
            "epoch": self.epoch, "done": self.done, "step": self.step, "history": self.history,
            "timer": {**self.timer, "wall_s": self.wall_time()},
            "nets": {k: n.state_dict() for k, n in self.nets.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.precision.state_dict(), "ranks": ranks})

    def load_state_dict(self, state: dict) -> None:
        """Restore networks, optimisers, schedulers, scaler, counters, then this rank's pools, sums and RNG."""
        for k, n in self.nets.items():
            n.load_state_dict(state["nets"][k])
        for k in self.optimizers:
            self.optimizers[k].load_state_dict(state["optimizers"][k])
            self.schedulers[k].load_state_dict(state["schedulers"][k])
        self.precision.load_state_dict(state["scaler"])
        self.epoch, self.done, self.step = state["epoch"], state["done"], state["step"]
        self.history, self.timer = state["history"], state["timer"]
        mine = state["ranks"][D.get_rank()]
        for k, pool in self.pools.items():
            pool.load_state_dict(mine["pools"][k], self.device)
        self.sums = {k: v.to(self.device) for k, v in mine["sums"].items()}
        restore_rng(mine["rng"], self.device)
