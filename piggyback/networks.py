"""Lifelong generators: junyanz's ResnetGenerator and UnetGenerator with every conv a piggyback layer.

Layer layout, bias rule and module names follow junyanz/pytorch-CycleGAN-and-pix2pix `models/networks.py`
(reference/reference.md 1.1-1.3) exactly, so a pretrained `latest_net_G.pth` maps key by key onto these
modules. The residual and U-Net skips are kept (bug B2 of the public Piggyback code flattened them away).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .layers import PiggybackConv2d, PiggybackConvTranspose2d, num_unconstrained
from .norms import TaskBatchNorm2d

GENERATORS = ("resnet_6blocks", "resnet_9blocks", "unet_128", "unet_256")
NORMS = ("instance", "batch", "none")


@dataclass(frozen=True)
class GeneratorConfig:
    """The architecture every task of a generator bank shares; saved in each checkpoint's meta.json."""

    netG: str = "resnet_9blocks"       # resnet_6blocks | resnet_9blocks | unet_128 | unet_256
    input_nc: int = 3                  # Channels in.
    output_nc: int = 3                 # Channels out.
    ngf: int = 64                      # Filters of the first conv.
    norm: str = "instance"             # instance (affine=False, no state) | batch | none
    use_dropout: bool = False          # Dropout(0.5) in ResNet blocks / U-Net middle blocks.
    lam: float = 0.25                  # Default unconstrained fraction of every layer for tasks >= 2.
    lam_overrides: dict = field(default_factory=dict)  # {layer name | "first" | "last": lambda}

    def __post_init__(self):
        if self.netG not in GENERATORS:
            raise ValueError(f"netG: {self.netG!r} is not one of {list(GENERATORS)}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: {self.norm!r} is not one of {list(NORMS)}")
        for key, lam in [("lam", self.lam)] + [(f"lam_overrides.{k}", v) for k, v in self.lam_overrides.items()]:
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
                raise ValueError(f"{key}: lambda must be in (0, 1], got {lam!r}")
        object.__setattr__(self, "lam_overrides", {str(k): float(v) for k, v in self.lam_overrides.items()})

    @classmethod
    def from_model_config(cls, model_cfg: Any) -> "GeneratorConfig":
        """The generator part of a `piggyback.config.ModelConfig` (netD/ndf/n_layers_D are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: getattr(model_cfg, k) for k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """junyanz get_norm_layer: batch -> (per-task) BatchNorm, instance -> InstanceNorm(affine=False), none."""
    if norm == "batch":
        return TaskBatchNorm2d
    if norm == "instance":
        return lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    return lambda c: nn.Identity()


class ResnetBlock(nn.Module):
    """junyanz ResnetBlock (reflection padding): x + conv_block(x), no activation after the sum."""

    def __init__(self, dim: int, norm: str, use_dropout: bool, use_bias: bool, lam: float):
        super().__init__()
        make_norm = norm_factory(norm)
        layers = [nn.ReflectionPad2d(1), PiggybackConv2d(dim, dim, 3, bias=use_bias, lam=lam), make_norm(dim),
                  nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), PiggybackConv2d(dim, dim, 3, bias=use_bias, lam=lam), make_norm(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)   # the skip (dropped by the public code, bug B2)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, d2ngf, d4ngf, n_blocks x R4ngf, u2ngf, u ngf, c7s1-output_nc, Tanh (reference.md 1.2)."""

    def __init__(
        self,
        input_nc: int,                          # Channels in.
        output_nc: int,                         # Channels out.
        ngf: int = 64,                          # Filters of the first conv.
        norm: str = "instance",                 # instance | batch | none
        use_dropout: bool = False,              # Dropout(0.5) inside each ResnetBlock.
        n_blocks: int = 9,                      # 6 or 9 residual blocks.
        lam: float = 0.25,                      # Default lambda of every piggyback layer.
    ):
        super().__init__()
        use_bias = norm == "instance"           # junyanz: convs before a BatchNorm (or none) have no bias
        make_norm = norm_factory(norm)
        model = [nn.ReflectionPad2d(3), PiggybackConv2d(input_nc, ngf, 7, bias=use_bias, lam=lam),
                 make_norm(ngf), nn.ReLU(True)]
        for i in range(2):                      # downsampling: (ngf, H, W) -> (4ngf, H/4, W/4)
            mult = 2 ** i
            model += [PiggybackConv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias, lam=lam),
                      make_norm(ngf * mult * 2), nn.ReLU(True)]
        for _ in range(n_blocks):
            model += [ResnetBlock(ngf * 4, norm, use_dropout, use_bias, lam)]
        for i in range(2):                      # upsampling: (4ngf, H/4, W/4) -> (ngf, H, W)
            mult = 2 ** (2 - i)
            model += [PiggybackConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                               output_padding=1, bias=use_bias, lam=lam),
                      make_norm(ngf * mult // 2), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), PiggybackConv2d(ngf, output_nc, 7, lam=lam), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)                    # (B, input_nc, H, W) -> (B, output_nc, H, W)


class UnetSkipConnectionBlock(nn.Module):
    """junyanz UnetSkipConnectionBlock: down -> submodule -> up, concatenated with its input (skip)."""

    def __init__(
        self,
        outer_nc: int,                          # Channels this block returns (before the skip concat).
        inner_nc: int,                          # Channels of its down conv.
        input_nc: int | None = None,            # Channels in (default outer_nc).
        submodule: nn.Module | None = None,     # The next-inner block (None for the innermost).
        outermost: bool = False,
        innermost: bool = False,
        norm: str = "batch",
        use_dropout: bool = False,
        lam: float = 0.25,
    ):
        super().__init__()
        self.outermost = outermost
        use_bias = norm == "instance"
        make_norm = norm_factory(norm)
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = PiggybackConv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=use_bias, lam=lam)
        # junyanz's in-place LeakyReLU also rewrites the block input that the skip concatenates below;
        # kept as is so that pretrained junyanz weights reproduce their outputs.
        downrelu, uprelu = nn.LeakyReLU(0.2, True), nn.ReLU(True)
        if outermost:
            upconv = PiggybackConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, lam=lam)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = PiggybackConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=use_bias, lam=lam)
            model = [downrelu, downconv, uprelu, upconv, make_norm(outer_nc)]
        else:
            upconv = PiggybackConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=use_bias, lam=lam)
            model = [downrelu, downconv, make_norm(inner_nc), submodule, uprelu, upconv, make_norm(outer_nc)]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)

    def forward(self, x: Tensor) -> Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)    # skip: (B, C_in + outer_nc, H, W)


class UnetGenerator(nn.Module):
    """U-Net with num_downs halvings (unet_128: 7, unet_256: 8); input sides divisible by 2**num_downs."""

    def __init__(
        self,
        input_nc: int,                          # Channels in.
        output_nc: int,                         # Channels out.
        num_downs: int,                         # 7 for unet_128, 8 for unet_256.
        ngf: int = 64,                          # Filters of the outermost down conv.
        norm: str = "batch",                    # batch | instance | none
        use_dropout: bool = False,              # Dropout(0.5) in the num_downs - 5 middle ngf*8 blocks.
        lam: float = 0.25,                      # Default lambda of every piggyback layer.
    ):
        super().__init__()
        kw = dict(norm=norm, lam=lam)
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, innermost=True, **kw)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, use_dropout=use_dropout, **kw)
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, **kw)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, **kw)
        block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, **kw)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)                    # (B, input_nc, H, W) -> (B, output_nc, H, W)


def build_generator(cfg: GeneratorConfig) -> nn.Module:
    """The generator of `cfg` with 0 tasks (no weights yet): call `lifelong.add_task` to start task 1.

    Every conv / transposed conv is a piggyback layer whose default lambda is `cfg.lam`, or the value
    `cfg.lam_overrides` gives for its name ("model.26"), for "first" (the layer reading the input) or
    "last" (the layer producing the output). The config is kept as `net.config`.
    """
    common = dict(ngf=cfg.ngf, norm=cfg.norm, use_dropout=cfg.use_dropout, lam=cfg.lam)
    if cfg.netG.startswith("resnet_"):
        net = ResnetGenerator(cfg.input_nc, cfg.output_nc, n_blocks=int(cfg.netG[7]), **common)
    else:
        net = UnetGenerator(cfg.input_nc, cfg.output_nc, num_downs={"unet_128": 7, "unet_256": 8}[cfg.netG], **common)
    layers = piggyback_layer_names(net)
    aliases = {"first": layers[0], "last": layers[-1]}
    modules = dict(net.named_modules())
    for key, lam in cfg.lam_overrides.items():
        name = aliases.get(key, key)
        if name not in layers:
            raise ValueError(f"lam_overrides.{key}: no such piggyback layer (use 'first', 'last' or one of "
                             f"{layers[0]!r} ... {layers[-1]!r})")
        num_unconstrained(lam, modules[name].out_channels)
        modules[name].lam = lam
    net.config = cfg
    return net


def piggyback_layer_names(net: nn.Module) -> list[str]:
    """Names of the piggyback layers in module order: the first reads the input, the last writes the output."""
    return [n for n, m in net.named_modules() if isinstance(m, (PiggybackConv2d, PiggybackConvTranspose2d))]
