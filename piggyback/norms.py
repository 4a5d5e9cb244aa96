"""Per-task batch normalisation: every task keeps its own affine parameters and running statistics.

The public Piggyback code never stores norm state per task (docs/method.md, "Every per-task tensor stored"), so
earlier tasks come back with the wrong statistics. Here task s's BatchNorm state is kept in buffers
and is never updated again, even in train mode; the trainable task behaves exactly like junyanz's
`nn.BatchNorm2d(affine=True, track_running_stats=True)`.

Both batch norms here (`TaskBatchNorm2d` in the generators, `BatchNorm2d` in the discriminators) can
normalise a batch assembled from several calls' inputs with each call's own statistics (`SeparateCalls`),
so that a training step may run independent calls through one network as one batched call
(`models.split_call`) and still compute what the separate calls compute.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .taskmodule import TaskModule

_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class SeparateCalls:
    """A batch norm that can treat its input as several calls' batches concatenated along dim 0.

    While `calls` holds those batches' sizes (set by `models.split_call` for one forward), a train-mode
    forward normalises each part with its own batch statistics and updates the running statistics once
    per part, in order: what the separate calls would do, part for part. Outside that (`calls` None,
    the default) and in eval mode, where the running statistics make the layer per-sample anyway, it is
    the plain layer.
    """

    calls: Optional[tuple[int, ...]] = None

    def forward(self, x: Tensor) -> Tensor:
        if self.calls is None or not self.training:
            return self.normalise(x)
        if x.shape[0] != sum(self.calls):
            raise ValueError(f"batch of {x.shape[0]} does not split into the calls {list(self.calls)}")
        return torch.cat([self.normalise(part) for part in x.split(self.calls, 0)], 0)

    def normalise(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class BatchNorm2d(SeparateCalls, nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state dict) that can keep several calls' statistics
    apart (`SeparateCalls`): the discriminators' batch norm."""

    def normalise(self, x: Tensor) -> Tensor:
        return nn.BatchNorm2d.forward(self, x)


class TaskBatchNorm2d(SeparateCalls, TaskModule):
    """BatchNorm2d with one set of (weight, bias, running_mean, running_var, num_batches_tracked) per task,
    several calls' statistics kept apart on request (`SeparateCalls`).

    The trainable task uses the plain nn.BatchNorm2d names (Parameters `weight`, `bias`; buffers
    `running_mean`, `running_var`, `num_batches_tracked`); frozen task s uses buffers `<name>_<s>`.
    """

    task_tensors = {name: name for name in _STATE}

    def __init__(
        self,
        num_features: int,                      # C, channels normalised.
        eps: float = 1e-5,                      # nn.BatchNorm2d default.
        momentum: float = 0.1,                  # nn.BatchNorm2d default (running-stat update rate).
    ):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self._num_tasks = 0
        for name in _STATE:
            (self.register_parameter if name in ("weight", "bias") else self.register_buffer)(name, None)

    # -- task operations ---------------------------------------------------------------------------
    def _new_task(self, lam: float | None) -> None:
        """Fresh affine parameters and statistics (`lam` does not apply to a norm)."""
        device = self._device()
        c = self.num_features
        self.weight = nn.Parameter(torch.empty(c, device=device))
        self.bias = nn.Parameter(torch.empty(c, device=device))
        self.running_mean = torch.zeros(c, device=device)
        self.running_var = torch.ones(c, device=device)
        self.num_batches_tracked = torch.zeros((), dtype=torch.long, device=device)
        self._num_tasks += 1

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """junyanz init for BatchNorm2d: weight ~ N(1, 0.02), bias 0 (stats were reset by `add_task`)."""
        if self.weight is not None:
            nn.init.normal_(self.weight, 1.0, 0.02)
            nn.init.zeros_(self.bias)

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    def _device(self) -> torch.device:
        for tensor in list(self._buffers.values()) + list(self._parameters.values()):
            if tensor is not None:
                return tensor.device
        return torch.device("cpu")

    # -- forward -----------------------------------------------------------------------------------
    def normalise(self, x: Tensor) -> Tensor:
        t = self._active()
        if t == self.trainable_task:
            # Exactly nn.BatchNorm2d: batch statistics in train mode, running statistics updated.
            if self.training:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, self.momentum, self.eps)
        s = self.task_state(t)
        if self.training:
            # A frozen task normalises with batch statistics, as BatchNorm does in train mode, but
            # passes no running buffers, so nothing of it can change.
            return F.batch_norm(x, None, None, s["weight"], s["bias"], True, 0.0, self.eps)
        return F.batch_norm(x, s["running_mean"], s["running_var"], s["weight"], s["bias"], False, 0.0, self.eps)

    @torch.no_grad()
    def to_dense(self, t: int) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d holding task t's state (for materialised inference)."""
        s = self.task_state(t)
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, device=s["weight"].device)
        for name in _STATE:
            getattr(bn, name).copy_(s[name])
        return bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, tasks={self.num_tasks}, active={self.active_task}"
