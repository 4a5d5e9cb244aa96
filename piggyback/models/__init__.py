"""Model recipes (Zhu et al. 2017 CycleGAN, Isola et al. 2017 pix2pix): losses and one explicit update each.

`cyclegan.train_step` / `pix2pix.train_step` compute junyanz's `optimize_parameters` losses and updates;
the networks they receive are the DDP wrappers (called directly, so gradients are synchronised: the
public Piggyback code called `model.module` and skipped that). Where one batched call through a network
computes what separate calls compute (`batchable`: per-sample layers, batch norms that keep each call's
statistics apart, no active dropout), independent calls through it are batched into one (`split_call`:
same outputs; the weight gradients are summed in another order). Shared helpers live here: gradient
toggles, the batching check and call, and the optional mixed-precision context.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from piggyback.norms import SeparateCalls


def set_requires_grad(nets: Iterable[nn.Module], flag: bool) -> None:
    """Freeze / unfreeze whole networks (junyanz `set_requires_grad`): no D gradients in the G step."""
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def batchable(*nets: nn.Module) -> bool:
    """True when independent calls through each network can run as one batched call (`split_call`) that
    computes what the separate calls compute, in the networks' current mode.

    Each image must be mapped independently of the others (instance norm, no norm, eval-mode batch norm),
    or its train-mode batch norms must keep each call's statistics apart (`norms.SeparateCalls`: this
    project's batch norms do; a plain nn.BatchNorm2d would mix the calls). Active dropout rules batching
    out: one batched call would draw other masks than separate calls.
    """
    for net in nets:
        for m in net.modules():
            if not m.training or isinstance(m, SeparateCalls):
                continue
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return False
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return False
    return True


def split_call(net: nn.Module, *inputs: Tensor) -> tuple[Tensor, ...]:
    """(net(x) for x in inputs) as one call on the inputs concatenated, for a `batchable` net: its batch
    norms normalise each input's part with that part's statistics, in the order given (the running
    statistics are updated as the separate calls would update them)."""
    sizes = tuple(x.shape[0] for x in inputs)
    norms = [m for m in net.modules() if isinstance(m, SeparateCalls)]
    for m in norms:
        m.calls = sizes
    try:
        out = net(torch.cat(inputs, 0))
    finally:
        for m in norms:
            m.calls = None
    return tuple(out.split(sizes, 0))


@dataclass(frozen=True)
class StepTools:
    """What a recipe's `train_step` uses besides the networks, the optimisers and the batch."""

    gan: Any                     # losses.GANLoss of the task's gan_mode
    cfg: Any                     # config.CycleGANConfig or config.Pix2PixConfig (loss weights, pool size)
    pools: dict                  # ImagePool per pooled fake (make_pools)
    prec: "Precision"            # autocast / gradient scaling
    batch_calls: bool = False    # batch independent calls through `batchable` networks (train.batch_calls)


ADAM_IMPLS = ("auto", "default", "loop", "foreach", "fused")

#: `auto` takes the fused step for an optimiser of at least this many parameters on the CPU. Measured on a
#: 2-core Zen 4, one step: 18.8M parameters (pix2pix task 3: the U-Net's trainable share and the PatchGAN)
#: loop 29.3 ms, foreach 43.4 ms, fused 10.4 ms; 6.8M (a ResNet generator's share and a PatchGAN) 11.9 /
#: 13.7 / 4.7 ms. Below it (the embedded suite: about 0.5M per optimiser) a step takes about a millisecond
#: either way, and the suite keeps the loop, so its published numbers stay bit for bit.
ADAM_FUSED_MIN_PARAMS = 2_000_000


def adam_options(impl: str, params: Iterable[Tensor] = ()) -> dict:
    """torch.optim.Adam keywords for `train.adam_impl` and the tensors `params` it will update.

    auto (the default): fused on the CPU for at least ADAM_FUSED_MIN_PARAMS parameters, else default.
    default: PyTorch's choice for the device (the loop on a CPU, foreach on CUDA).
    loop: one kernel per tensor and operation; foreach: multi-tensor kernels, bit-identical to the loop
    (PyTorch's own default on CUDA); fused: one kernel for the whole update, equal to float rounding only.
    """
    if impl not in ADAM_IMPLS:
        raise ValueError(f"train.adam_impl must be one of {ADAM_IMPLS}, got {impl!r}")
    if impl == "auto":
        params = list(params)
        on_cpu = bool(params) and all(p.device.type == "cpu" for p in params)
        impl = "fused" if on_cpu and sum(p.numel() for p in params) >= ADAM_FUSED_MIN_PARAMS else "default"
    return {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[impl]


class Precision:
    """Autocast (bf16 | fp16) on CUDA, with a GradScaler for fp16; plain float32 everywhere else.

    One scaler serves both optimisers: each loss is scaled, each optimiser stepped through the scaler,
    and `update()` is called once per iteration (the PyTorch AMP recipe for several optimisers).
    """

    def __init__(self, amp: str, device: torch.device) -> None:
        if amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be none | bf16 | fp16, got {amp!r}")
        if amp != "none" and device.type != "cuda":
            warnings.warn(f"train.amp={amp!r} is ignored on {device.type}: mixed precision is CUDA-only here")
            amp = "none"
        self.amp, self.device = amp, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def recipe(mode: str):
    """The module implementing `mode` ("cyclegan" | "pix2pix")."""
    if mode == "cyclegan":
        from piggyback.models import cyclegan

        return cyclegan
    if mode == "pix2pix":
        from piggyback.models import pix2pix

        return pix2pix
    raise ValueError(f"unknown mode {mode!r}: expected cyclegan | pix2pix")
