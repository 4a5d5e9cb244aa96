"""The base of every module that holds per-task state (piggyback convolutions, per-task batch norms).

Such a module holds any number of learned tasks, numbered from 1, and at most one trainable task (always the
last). The trainable task's tensors are ordinary attributes (Parameters, or buffers for running statistics);
`freeze` moves them into per-task storage, `thaw` moves the last task back. Per-task storage defaults to one
buffer ``<key>_<t>`` per tensor; a subclass may store a tensor elsewhere (the piggyback layers append their
new filters to the filter bank) by overriding `_store` / `_stored` / `_unstore` for that key.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def check_task(t: int, num_tasks: int) -> None:
    """Task numbers are 1-based; ValueError naming the task otherwise."""
    if not 1 <= t <= num_tasks:
        raise ValueError(f"task {t} does not exist: this layer has {num_tasks} task(s)")


class TaskModule(nn.Module):
    """Task bookkeeping shared by every per-task module: freeze, thaw, set_task and `task_state`.

    Subclasses set `task_tensors` (state key -> attribute of the trainable task's tensor, in the order
    `task_state` returns them), implement `num_tasks`, `_new_task` (fresh trainable tensors, the task
    counted) and `reset_parameters`, and run `self._active()` in forward.
    """

    task_tensors: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__()
        self.active_task = 0                    # Task `forward` runs (1-based; 0 = none yet).
        self.trainable_task = 0                 # Task held in trainable attributes (0 = all frozen).

    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    def _new_task(self, lam: Optional[float]) -> None:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def add_task(self, lam: Optional[float] = None) -> None:
        """Freeze the trainable task (if any), add a new trainable task with freshly initialised tensors and
        run it. `lam`: the piggyback layers' unconstrained fraction (ignored by modules without filters)."""
        self.freeze()
        self._new_task(lam)
        self.trainable_task = self.active_task = self.num_tasks
        self.reset_parameters()

    # -- per-task storage (one buffer per tensor unless a subclass says otherwise) ---------------------
    def _store(self, key: str, t: int, value: Tensor) -> None:
        self.register_buffer(f"{key}_{t}", value.clone())

    def _stored(self, key: str, t: int) -> Optional[Tensor]:
        return self._buffers.get(f"{key}_{t}")

    def _unstore(self, key: str, t: int) -> Optional[Tensor]:
        return self._buffers.pop(f"{key}_{t}", None)

    # -- task operations -----------------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self) -> None:
        """Move the trainable task (if any) into per-task storage: nothing of it can change any more."""
        t = self.trainable_task
        if not t:
            return
        for key, attr in self.task_tensors.items():
            value = getattr(self, attr)
            if value is not None:
                self._store(key, t, value.detach())
        for attr in self.task_tensors.values():
            setattr(self, attr, None)
        self.trainable_task = 0

    @torch.no_grad()
    def thaw(self) -> None:
        """Inverse of `freeze` for the last task: make it trainable again (fine-tuning baseline)."""
        t = self.num_tasks
        if not t or self.trainable_task:
            return
        for key, attr in self.task_tensors.items():
            value = self._unstore(key, t)
            if value is not None and attr in self._parameters:
                value = nn.Parameter(value)
            setattr(self, attr, value)
        self.trainable_task = t

    def set_task(self, t: int) -> None:
        """Choose which learned task `forward` runs."""
        check_task(t, self.num_tasks)
        self.active_task = t

    def task_state(self, t: int) -> dict[str, Tensor]:
        """Task t's own tensors, keyed by `task_tensors` (absent where the task has none): the one accessor."""
        check_task(t, self.num_tasks)
        if t == self.trainable_task:
            out = {key: getattr(self, attr) for key, attr in self.task_tensors.items()}
        else:
            out = {key: self._stored(key, t) for key in self.task_tensors}
        return {k: v for k, v in out.items() if v is not None}

    def _active(self) -> int:
        """The task `forward` runs; an error before the first `add_task`."""
        if not self.active_task:
            raise RuntimeError(f"{type(self).__name__} has no task yet: call add_task() first")
        return self.active_task
