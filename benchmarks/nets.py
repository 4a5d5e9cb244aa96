"""The networks under test and the work timed on them: a generator training step and an inference call.

Candidates for one case (same architecture, same device, same memory format, same precision):
- ``plain``: junyanz's structure built from nn.Conv2d / nn.ConvTranspose2d / nn.BatchNorm2d holding task 3's
  dense weights (built here, independently of `lifelong.materialize`); every parameter trainable.
- ``task1``: a piggyback network with one task, training it (its filters are plain Parameters).
- ``task3``: a piggyback network with tasks 1-2 frozen, training task 3 (new filters, mixing matrices,
  biases and norm affine of task 3 only; weights composed from the bank on every forward).
- inference: ``materialized`` (`lifelong.materialize(net, 3)`) and ``piggyback`` (the bank network in eval
  mode, composing its weights on every call) against ``plain``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from piggyback import lifelong
from piggyback.convkernels import set_conv_kernels
from piggyback.layers import PIGGYBACK_LAYERS
from piggyback.models import Precision, StepTools, adam_options
from piggyback.networks import GeneratorConfig, build_generator
from piggyback.norms import TaskBatchNorm2d

from .core import synchronize

# junyanz defaults per generator: CycleGAN's ResNets (instance norm), pix2pix's U-Nets (batch norm, dropout).
ARCH = {
    "resnet_6blocks": {"norm": "instance", "use_dropout": False, "recipe": "cyclegan"},
    "resnet_9blocks": {"norm": "instance", "use_dropout": False, "recipe": "cyclegan"},
    "unet_128": {"norm": "batch", "use_dropout": True, "recipe": "pix2pix"},
    "unet_256": {"norm": "batch", "use_dropout": True, "recipe": "pix2pix"},
}


@dataclass(frozen=True)
class Case:
    netG: str
    size: int          # square input side
    batch: int = 1
    ngf: int = 64
    lam: float = 0.25

    @property
    def name(self) -> str:
        return f"{self.netG}@{self.size}" + (f"xb{self.batch}" if self.batch != 1 else "")

    def config(self) -> GeneratorConfig:
        a = ARCH[self.netG]
        return GeneratorConfig(netG=self.netG, ngf=self.ngf, norm=a["norm"], use_dropout=a["use_dropout"], lam=self.lam)

    def to_dict(self) -> dict:
        return {"netG": self.netG, "size": self.size, "batch": self.batch, "ngf": self.ngf, "lam": self.lam,
                "norm": ARCH[self.netG]["norm"], "use_dropout": ARCH[self.netG]["use_dropout"],
                "recipe": ARCH[self.netG]["recipe"]}


# -- building ------------------------------------------------------------------------------------
def lifelong_net(case: Case, tasks: int, seed: int = 0) -> nn.Module:
    """A piggyback generator with `tasks` tasks: the first tasks-1 frozen, the last trainable and running."""
    torch.manual_seed(seed)
    net = build_generator(case.config())
    for _ in range(tasks):
        lifelong.add_task(net)
    return lifelong.set_task(net, tasks)


@torch.no_grad()
def _dense(module: nn.Module, t: int) -> nn.Module:
    """A freshly constructed plain module holding task t's state of a piggyback conv / TaskBatchNorm2d."""
    if isinstance(module, TaskBatchNorm2d):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum)
        bn.load_state_dict({k: v.detach().clone() for k, v in module.task_state(t).items()})
        return bn
    weight, bias = module.task_weight(t), module.task_state(t).get("bias")
    args = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding)
    if module.transposed:
        conv = nn.ConvTranspose2d(*args, output_padding=module.output_padding, bias=module.has_bias)
    else:
        conv = nn.Conv2d(*args, bias=module.has_bias)
    conv.weight.copy_(weight)
    if module.has_bias:
        conv.bias.copy_(bias)
    return conv


def plain_copy(net: nn.Module, t: int) -> nn.Module:
    """The same network built from plain torch.nn layers with task t's weights (train mode, all trainable)."""
    plain = copy.deepcopy(net)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, PIGGYBACK_LAYERS + (TaskBatchNorm2d,)):
                setattr(parent, name, _dense(child, t))
            else:
                swap(child)

    swap(plain)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain.train()


def candidate_net(case: Case, which: str, seed: int = 0) -> nn.Module:
    """One training candidate: plain | task1 | task3 (all in train mode)."""
    if which == "task1":
        return lifelong_net(case, 1, seed).train()
    net = lifelong_net(case, 3, seed)
    if which == "task3":
        return net.train()
    if which == "plain":
        plain = plain_copy(net, 3)
        del net
        return plain
    raise ValueError(f"unknown training candidate {which!r}")


def infer_candidate(case: Case, which: str) -> nn.Module:
    """One inference candidate: plain | materialized | piggyback (all in eval mode, task 3's weights)."""
    net = lifelong_net(case, 3)
    if which == "piggyback":
        return net.eval()
    if which == "materialized":
        return lifelong.materialize(net, 3).eval()
    if which == "plain":
        return plain_copy(net, 3).eval()
    raise ValueError(f"unknown inference candidate {which!r}")


# -- the timed work ------------------------------------------------------------------------------
def trainable(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def adam(params: list[nn.Parameter], impl: str = "auto") -> torch.optim.Optimizer:
    """Adam with the recipe's settings and the library's implementation choice (`train.adam_impl`)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999), **adam_options(impl, params))


def _precision(device: torch.device) -> Precision:
    """bf16 autocast on CUDA, float32 on the CPU (bf16 convolutions are slower there): every candidate alike."""
    return Precision("bf16" if device.type == "cuda" else "none", device)


def inputs(case: Case, device: torch.device, channels_last: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed input in [-1, 1] and a fixed target in [-1, 1] of the case's shape."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(case.batch, 3, case.size, case.size, generator=g) * 2 - 1
    y = torch.rand(case.batch, 3, case.size, case.size, generator=g) * 2 - 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device).contiguous(memory_format=fmt), y.to(device).contiguous(memory_format=fmt)


def place(net: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def train_step_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], float]:
    """One generator update: zero grads, forward (autocast on CUDA), L1 to the target, backward, Adam step."""
    opt = adam(trainable(net))

    def step():
        opt.zero_grad(set_to_none=True)
        with _precision(device).autocast():
            out = net(x)
        loss = F.l1_loss(out.float(), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def infer_fn(net: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], torch.Tensor]:
    def run():
        with torch.inference_mode(), _precision(device).autocast():
            return net(x)

    return run


# -- diagnostics ---------------------------------------------------------------------------------
def conv_macs(net: nn.Module, x: torch.Tensor) -> dict:
    """Multiply-accumulates of one forward (convolutions) and the extra work of the piggyback layers.

    Per layer, in the order the layer picks for this input (`order_for`):
    compose: p * N * d to compose, once forward and once backward (the mixing matrix's gradient);
    mix outputs: the convolution runs over m + N filters instead of n (forward and input gradient), the
    weight gradient over m only, and mixing costs p * N per output pixel (forward and two gradients).
    A training step does about 3x the forward conv work, hence the predicted step-time ratio
    1 + extra / (3 conv).
    """
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda _mod, inp, key=id(m): seen.__setitem__(
        key, torch.empty(inp[0].shape, device="meta")))
        for m in net.modules() if isinstance(m, PIGGYBACK_LAYERS)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    conv = compose = extra_train = extra_infer = 0
    mixed_layers = 0
    for m in net.modules():
        if not isinstance(m, PIGGYBACK_LAYERS):
            continue
        inp = seen[id(m)]
        n, d = m.out_channels, m.filter_size
        per_filter, out_pixels = m.conv_work(inp)
        conv += n * per_filter
        t = m.active_task
        if t < 2 or m.num_new(t) == n:
            continue
        p, n_bank = n - m.num_new(t), m.bank_rows_before(t)
        if m.order_for(inp, n_bank, p) == "mix_outputs":
            mixed_layers += 1
            mix = p * n_bank * out_pixels
            extra_train += (2 * (n_bank - p) - p) * per_filter + 3 * mix
            extra_infer += (n_bank - p) * per_filter + mix
        else:
            compose += p * n_bank * d
            extra_train += 2 * p * n_bank * d
            extra_infer += p * n_bank * d
    return {"conv_macs": conv, "compose_macs": compose, "mix_outputs_layers": mixed_layers,
            "extra_train_macs": extra_train,
            "predicted_train_ratio": 1 + extra_train / (3 * conv) if conv else None,
            "predicted_infer_ratio_unmaterialized": 1 + extra_infer / conv if conv else None}


def compose_time(net: nn.Module, device: torch.device, repeats: int = 5) -> dict:
    """Median time to compose every layer's active-task weight: no grad, and with autograd + backward."""
    layers = [m for m in net.modules() if isinstance(m, PIGGYBACK_LAYERS)]

    def forward_only():
        with torch.no_grad():
            for m in layers:
                m.task_weight(m.active_task)

    def with_backward():
        total = 0
        for m in layers:
            w = m.task_weight(m.active_task)
            total = total + w.sum()
        if isinstance(total, torch.Tensor) and total.requires_grad:
            total.backward()
        for p in net.parameters():
            p.grad = None

    out = {}
    for key, fn in (("compose_nograd_s", forward_only), ("compose_fwd_bwd_s", with_backward)):
        fn()
        samples = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples.append(time.perf_counter() - start)
        out[key] = sorted(samples)[len(samples) // 2]
    return out


# -- the real recipe (discriminators, pools, GAN losses) --------------------------------------------
#: Variants of our recipe step, each one lever away from the default (`train.*` keys of the same name).
LEVERS = {"unbatched": {"batch_calls": False}, "adam_default": {"adam_impl": "default"},
          "adam_foreach": {"adam_impl": "foreach"}, "channels_last": {"channels_last": True},
          "direct_kernels": {"conv_kernels": "direct"}}


def _recipe_nets(case: Case, which: str, device: torch.device, channels_last: bool, seed: int) -> dict:
    """Generators of kind `which` (G_B gets other weights than G_A) and fresh junyanz PatchGANs (ndf = ngf)."""
    from piggyback.discriminators import build_discriminator
    from piggyback.models import recipe

    mode, norm = ARCH[case.netG]["recipe"], ARCH[case.netG]["norm"]
    R = recipe(mode)
    gens = {name: candidate_net(case, which, seed + k) for k, name in enumerate(R.GENERATORS)}
    d_in = {"D_A": 3, "D_B": 3} if mode == "cyclegan" else {"D_A": 6}
    torch.manual_seed(seed + 10)
    ds = {k: build_discriminator("basic", d_in[k], case.ngf, 3, norm) for k in R.DISCRIMINATORS}
    return {k: place(v, device, channels_last) for k, v in {**gens, **ds}.items()}


def recipe_step_fn(case: Case, which: str, device: torch.device, channels_last: bool, seed: int = 0,
                   batch_calls: bool = True, adam_impl: str = "auto",
                   conv_kernels: str = "auto") -> tuple[Callable[[], object], dict]:
    """One full iteration of the case's recipe as training runs it (`cyclegan.train_step` / `pix2pix.train_step`).

    The generators are `which` (plain | task1 | task3), the optimisers the recipe's Adam (G: the
    generators' trainable tensors; D: all of D) in `adam_impl`, the piggyback layers' training kernels
    `conv_kernels` (`train.conv_kernels`, generators and discriminators), precision bf16 autocast on CUDA; batch 1.
    Returns (step, info).
    """
    from piggyback.config import CycleGANConfig, Pix2PixConfig
    from piggyback.losses import GANLoss
    from piggyback.models import recipe

    mode = ARCH[case.netG]["recipe"]
    R = recipe(mode)
    mcfg = CycleGANConfig() if mode == "cyclegan" else Pix2PixConfig()
    nets = _recipe_nets(case, which, device, channels_last, seed)
    for net in nets.values():
        set_conv_kernels(net, conv_kernels)
    opt = {"G": adam([p for k in R.GENERATORS for p in trainable(nets[k])], adam_impl),
           "D": adam([p for k in R.DISCRIMINATORS for p in nets[k].parameters()], adam_impl)}
    prec = _precision(device)
    gan = GANLoss(mcfg.gan_mode).to(device)
    pools = R.make_pools(mcfg, seed)
    real_A, real_B = inputs(case, device, channels_last, seed=seed + 1)

    def step():
        return R.train_step(nets, opt, real_A, real_B, StepTools(gan, mcfg, pools, prec, batch_calls))

    info = {"recipe": mode, "generators": list(R.GENERATORS), "discriminators": list(R.DISCRIMINATORS),
            "batch_calls": batch_calls, "adam_impl": adam_impl, "channels_last": channels_last,
            "conv_kernels": conv_kernels,
            "trainable_G": sum(p.numel() for k in R.GENERATORS for p in trainable(nets[k])),
            "params_D": sum(p.numel() for k in R.DISCRIMINATORS for p in nets[k].parameters())}
    return step, info


def reference_step_fn(case: Case, device: torch.device, seed: int = 0) -> tuple[Callable[[], object], dict]:
    """The straightforward iteration (benchmarks/reference.py) on plain networks with task 3's weights:
    float32, NCHW, eager, default Adam, on any device. Returns (step, info)."""
    from piggyback.config import CycleGANConfig, Pix2PixConfig
    from piggyback.models import recipe

    from . import reference

    mode = ARCH[case.netG]["recipe"]
    R = recipe(mode)
    mcfg = CycleGANConfig() if mode == "cyclegan" else Pix2PixConfig()
    nets = _recipe_nets(case, "plain", device, False, seed)
    opt = {"G": reference.adam(p for k in R.GENERATORS for p in nets[k].parameters()),
           "D": reference.adam(p for k in R.DISCRIMINATORS for p in nets[k].parameters())}
    pools = R.make_pools(mcfg, seed)
    real_A, real_B = inputs(case, device, False, seed=seed + 1)

    def step():
        return reference.STEPS[mode](nets, opt, real_A, real_B, mcfg, pools)

    return step, {"recipe": mode, "implementation": "benchmarks/reference.py", "adam_impl": "torch default"}
