"""Lifelong generators: task operations on whole networks and the multi-task model every stage shares.

Implements the task life cycle of Piggyback GAN (Zhai et al., ECCV 2020; docs/method.md): add a task,
train only its tensors, freeze it into the bank, and run any learned task again later, exactly. The
baselines of the paper's Fig. 1 share the same code: "separate" (lambda 1 on every layer: a full new
generator per task) and "finetune" (one slot re-trained by every task, so earlier tasks are overwritten).
"""
from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from . import accounting
from .config import check_lam
from .convkernels import Conv2d
from .layers import PIGGYBACK_LAYERS
from .networks import GeneratorConfig, build_generator, resolve_layer_lams
from .taskmodule import TaskModule

METHODS = ("piggyback", "separate", "finetune")
MODES = {"cyclegan": ("G_A", "G_B"), "pix2pix": ("G_A",)}   # Code (paper): G_A (G: A->B), G_B (F: B->A)
DIRECTIONS = ("AtoB", "BtoA")
_RECORD_KEYS = ("name", "mode", "direction", "dataset", "lam", "index", "lambda", "finished", "overwritten_by",
                "hashes", "params", "new_params", "stored_params", "separate_params", "new_norm_params",
                "stored_norm_params", "separate_norm_params")


# -- task operations on a whole network -------------------------------------------------------------------
def task_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module holding per-task state: piggyback convs and TaskBatchNorm2d."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, TaskModule)]


def num_tasks(net: nn.Module) -> int:
    counts = {m.num_tasks for _, m in task_modules(net)}
    if len(counts) > 1:
        raise RuntimeError(f"inconsistent network: its layers hold {sorted(counts)} tasks")
    return counts.pop() if counts else 0


def add_task(net: nn.Module, lams: Optional[dict[str, float]] = None) -> int:
    """Freeze the current task and add a new trainable one to every layer; the network runs it. Returns t.

    `lams`: the lambda of every piggyback layer; default `networks.resolve_layer_lams(net.config, net)`."""
    if lams is None:
        lams = resolve_layer_lams(net.config, net)
    for name, m in task_modules(net):
        m.add_task(lams.get(name) if isinstance(m, PIGGYBACK_LAYERS) else None)
    return num_tasks(net)


def freeze(net: nn.Module) -> None:
    """Move the trainable task of every layer into frozen buffers."""
    for _, m in task_modules(net):
        m.freeze()


def thaw(net: nn.Module) -> None:
    """Make the last task trainable again (fine-tuning baseline: warm start from the stored weights)."""
    for _, m in task_modules(net):
        m.thaw()


def set_task(net: nn.Module, t: int) -> nn.Module:
    """Choose which learned task (1-based) the whole network runs."""
    for _, m in task_modules(net):
        m.set_task(t)
    return net


def task_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The trainable task's tensors: the only Parameters a lifelong generator has."""
    return [p for _, m in task_modules(net) for p in m.parameters(recurse=False)]


def task_state(net: nn.Module, t: int) -> dict[str, torch.Tensor]:
    """Task t's own tensors (bank rows, mix, bias, norm state), keyed '<module>.<tensor>'."""
    return {f"{n}.{k}": v for n, m in task_modules(net) for k, v in sorted(m.task_state(t).items())}


def task_hash(net: nn.Module, t: int) -> str:
    """sha256 over task t's own tensors (names, dtypes, shapes and bytes), device-independent."""
    h = hashlib.sha256()
    for key, v in task_state(net, t).items():
        v = v.detach().to("cpu").contiguous()
        h.update(f"{key}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def bank_lams(net: nn.Module) -> list[dict[str, float]]:
    """Per task, the lambda of every piggyback layer: with the config, all it takes to rebuild the bank."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, PIGGYBACK_LAYERS)]
    return [{n: m.lams[t] for n, m in layers} for t in range(num_tasks(net))]


@contextmanager
def reuse_composed_weights(*nets: nn.Module) -> Iterator[None]:
    """Compose each piggyback layer's weight once inside this scope, however often the nets are called.

    For one training iteration that calls a generator several times (CycleGAN: G(x), the cycle, the
    identity) before one backward: the same values as composing per call, and the mixing matrices'
    gradients are computed once instead of per call. The same for a plain `convkernels.Conv2d` (the
    discriminators): its Winograd weight transform, where `train.conv_kernels: auto` uses one. Leave the
    scope before the optimiser step: the cache holds weights of the current parameter values.
    """
    layers = [m for net in nets for m in net.modules() if isinstance(m, (*PIGGYBACK_LAYERS, Conv2d))]
    for m in layers:
        m.cache_composed_weights(True)
    try:
        yield
    finally:
        for m in layers:
            m.cache_composed_weights(False)


@torch.no_grad()
def materialize(net: nn.Module, t: Optional[int] = None) -> nn.Module:
    """A plain copy of `net` running task t (default: the active one) at plain-convolution speed.

    Every piggyback layer becomes an nn.Conv2d / nn.ConvTranspose2d holding the composed weight and every
    TaskBatchNorm2d an nn.BatchNorm2d with the task's state; the filter bank is not copied. Returned in
    eval mode; outputs equal the network's for task t.
    """
    modules = task_modules(net)
    t = t or (modules[0][1].active_task if modules else 0)
    # Pre-seeding deepcopy's memo swaps each task module for its dense replacement while copying the rest.
    memo = {id(m): m.to_dense(t) for _, m in modules}
    dense = copy.deepcopy(net, memo)
    dense.materialized_task = t
    return dense.eval()


# -- the lifelong model ---------------------------------------------------------------------------------
class LifelongModel(nn.Module):
    """Generator banks (G_A always; G_B from the first CycleGAN task) and the ordered task registry."""

    def __init__(
        self,
        config: GeneratorConfig,               # Architecture shared by every task and both banks.
        method: str = "piggyback",             # piggyback | separate | finetune
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method: {method!r} is not one of {list(METHODS)}")
        self.config, self.method = config, method
        self.generators = nn.ModuleDict({"G_A": build_generator(config)})
        self.tasks: list[dict[str, Any]] = []   # One record per task, in training order (JSON-ready).

    # -- registry ----------------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        return [r["name"] for r in self.tasks]

    def task(self, name: str) -> dict[str, Any]:
        for r in self.tasks:
            if r["name"] == name:
                return r
        raise KeyError(f"no task {name!r} (known: {', '.join(self.task_names()) or 'none'})")

    @property
    def pending(self) -> Optional[dict[str, Any]]:
        """The task being trained (added, not finished), if any."""
        return next((r for r in self.tasks if not r["finished"]), None)

    def _device(self) -> torch.device:
        return next(self.generators["G_A"].buffers()).device   # filter banks exist even with 0 tasks

    # -- life cycle --------------------------------------------------------------------------------
    def add_task(self, name: str, mode: str, direction: str = "AtoB", dataset: Optional[str] = None,
                 lam: Optional[float] = None) -> dict[str, nn.Module]:
        """Start task `name`; returns {"G_A": net(, "G_B": net)} running it, in train mode.

        Only the returned networks' Parameters (`task_parameters`) are trainable. A pix2pix task adds a
        task to G_A only; a CycleGAN task to G_A and G_B (G_B is created by the first such task).
        """
        if self.pending is not None:
            raise RuntimeError(f"task {self.pending['name']!r} is not finished: call finish_task() first")
        if not name or name in self.task_names():
            raise ValueError(f"task name {name!r} is empty or already used")
        if mode not in MODES or direction not in DIRECTIONS:
            raise ValueError(f"mode {mode!r} / direction {direction!r}: expected one of {list(MODES)} / {list(DIRECTIONS)}")
        lam = None if lam is None else check_lam(lam, "lam")
        if "G_B" in MODES[mode] and "G_B" not in self.generators:
            self.generators["G_B"] = build_generator(self.config).to(self._device())
        record = {"name": name, "mode": mode, "direction": direction, "dataset": dataset,
                  "lam": 1.0 if self.method == "separate" else self.config.lam if lam is None else float(lam),
                  "index": {}, "lambda": {},
                  "finished": False, "overwritten_by": {}}
        for which in MODES[mode]:
            net = self.generators[which]
            if self.method == "finetune" and num_tasks(net):
                thaw(net)                       # warm start: re-train the single slot in place
                for earlier in self.tasks:
                    if earlier["index"].get(which) == num_tasks(net):
                        earlier["overwritten_by"][which] = name
            else:
                lams = resolve_layer_lams(self.config, net, lam)
                add_task(net, {n: 1.0 for n in lams} if self.method == "separate" else lams)
            slot = num_tasks(net)
            set_task(net, slot).train()
            record["index"][which] = slot
            record["lambda"][which] = bank_lams(net)[slot - 1]
        self.tasks.append(record)
        return {which: self.generators[which] for which in MODES[mode]}

    def finish_task(self, **extra: Any) -> dict[str, Any]:
        """Freeze the task being trained; record its tensor hashes, parameter counts and `extra` fields."""
        record = self.pending
        if record is None:
            raise RuntimeError("no task to finish: call add_task() first")
        clash = sorted(set(extra) & set(_RECORD_KEYS))
        if clash:
            raise ValueError(f"finish_task: {clash[0]!r} is a reserved task-record field")
        per_gen, slots_so_far = {}, sum(len(r["index"]) for r in self.tasks)
        for which, slot in record["index"].items():
            net = self.generators[which]
            freeze(net)
            full, norm = accounting.full_params(net), accounting.norm_params_per_task(net)
            per_gen[which] = {"new_params": accounting.task_params(net, slot), "full_params": full,
                              "new_norm_params": norm}
        stored = {w: accounting.stored_params(n) for w, n in self.generators.items()}
        stored_norm = {w: accounting.norm_params_per_task(n) * num_tasks(n) for w, n in self.generators.items()}
        full, norm = accounting.full_params(self.generators["G_A"]), accounting.norm_params_per_task(self.generators["G_A"])
        record.update(
            hashes={w: task_hash(self.generators[w], s) for w, s in record["index"].items()},
            params=per_gen,
            new_params=sum(p["new_params"] for p in per_gen.values()),
            stored_params=sum(stored.values()),
            separate_params=full * slots_so_far,    # one full generator per (task, generator)
            new_norm_params=sum(p["new_norm_params"] for p in per_gen.values()),
            stored_norm_params=sum(stored_norm.values()),
            separate_norm_params=norm * slots_so_far,
            finished=True,
            **extra,
        )
        return record

    def generator(self, task: str, which: str = "G_A") -> nn.Module:
        """The shared bank network `which`, switched to run `task`, in eval mode.

        It is the same module every task uses: re-select the training task (or use the networks that
        `add_task` returned, after `.train()`) before training again. For a standalone copy at plain
        convolution speed use `materialize(model.generator(task), ...)` or `self.materialize`.
        """
        record = self.task(task)
        if which not in record["index"]:
            raise KeyError(f"task {task!r} ({record['mode']}) has no {which}; it has {sorted(record['index'])}")
        return set_task(self.generators[which], record["index"][which]).eval()

    def materialize(self, task: str, which: str = "G_A") -> nn.Module:
        """A dense, plain-PyTorch copy of `which` running `task` (see `materialize`)."""
        record = self.task(task)
        if which not in record["index"]:
            raise KeyError(f"task {task!r} ({record['mode']}) has no {which}; it has {sorted(record['index'])}")
        return materialize(self.generators[which], record["index"][which])

    # -- metadata (what a checkpoint needs to rebuild the model) ------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-ready architecture and registry: config, method, per-bank lambdas, task records."""
        return {
            "config": self.config.to_dict(),
            "method": self.method,
            "banks": {w: bank_lams(n) for w, n in self.generators.items()},
            "tasks": copy.deepcopy(self.tasks),
        }

    @classmethod
    def from_description(cls, desc: dict[str, Any]) -> "LifelongModel":
        """Rebuild the (frozen) banks with the right shapes from `describe()`; weights come from a state dict."""
        model = cls(GeneratorConfig(**desc["config"]), desc.get("method", "piggyback"))
        for which, slots in desc["banks"].items():
            if which not in model.generators:
                model.generators[which] = build_generator(model.config)
            net = model.generators[which]
            for lams in slots:
                add_task(net, lams)
            freeze(net)
            if slots:
                set_task(net, len(slots))
        model.tasks = copy.deepcopy(desc["tasks"])
        return model
