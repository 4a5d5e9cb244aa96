"""Lifelong generators: junyanz's ResnetGenerator and UnetGenerator with every conv a piggyback layer.

Layer layout, bias rule and module names follow junyanz/pytorch-CycleGAN-and-pix2pix `models/networks.py`
exactly, so a pretrained `latest_net_G.pth` maps key by key onto these modules. The residual and U-Net
skips are kept (the public Piggyback code flattened them away: docs/method.md, "Skips kept").
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .config import LAYER_GROUPS, GeneratorConfig
from .layers import PIGGYBACK_LAYERS, PiggybackConv2d, PiggybackConvTranspose2d
from .norms import TaskBatchNorm2d


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """junyanz get_norm_layer: batch -> (per-task) BatchNorm, instance -> InstanceNorm(affine=False), none."""
    if norm == "batch":
        return TaskBatchNorm2d
    if norm == "instance":
        return lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    return lambda c: nn.Identity()


class ResnetBlock(nn.Module):
    """junyanz ResnetBlock (reflection padding): x + conv_block(x), no activation after the sum."""

    def __init__(self, dim: int, norm: str, use_dropout: bool, use_bias: bool):
        super().__init__()
        make_norm = norm_factory(norm)
        layers = [nn.ReflectionPad2d(1), PiggybackConv2d(dim, dim, 3, bias=use_bias), make_norm(dim),
                  nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), PiggybackConv2d(dim, dim, 3, bias=use_bias), make_norm(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)   # the skip (dropped by the public code: docs/method.md, "Skips kept")


class ResnetGenerator(nn.Module):
    """c7s1-ngf, d2ngf, d4ngf, n_blocks x R4ngf, u2ngf, u ngf, c7s1-output_nc, Tanh (junyanz's notation)."""

    def __init__(
        self,
        input_nc: int,                          # Channels in.
        output_nc: int,                         # Channels out.
        ngf: int = 64,                          # Filters of the first conv.
        norm: str = "instance",                 # instance | batch | none
        use_dropout: bool = False,              # Dropout(0.5) inside each ResnetBlock.
        n_blocks: int = 9,                      # 6 or 9 residual blocks.
    ):
        super().__init__()
        use_bias = norm == "instance"           # junyanz: convs before a BatchNorm (or none) have no bias
        make_norm = norm_factory(norm)
        model = [nn.ReflectionPad2d(3), PiggybackConv2d(input_nc, ngf, 7, bias=use_bias),
                 make_norm(ngf), nn.ReLU(True)]
        for i in range(2):                      # downsampling: (ngf, H, W) -> (4ngf, H/4, W/4)
            mult = 2 ** i
            model += [PiggybackConv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                      make_norm(ngf * mult * 2), nn.ReLU(True)]
        for _ in range(n_blocks):
            model += [ResnetBlock(ngf * 4, norm, use_dropout, use_bias)]
        for i in range(2):                      # upsampling: (4ngf, H/4, W/4) -> (ngf, H, W)
            mult = 2 ** (2 - i)
            model += [PiggybackConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                               output_padding=1, bias=use_bias),
                      make_norm(ngf * mult // 2), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), PiggybackConv2d(ngf, output_nc, 7), nn.Tanh()]
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
    ):
        super().__init__()
        self.outermost = outermost
        use_bias = norm == "instance"
        make_norm = norm_factory(norm)
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = PiggybackConv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=use_bias)
        # junyanz's in-place LeakyReLU also rewrites the block input that the skip concatenates below;
        # kept as is so that pretrained junyanz weights reproduce their outputs.
        downrelu, uprelu = nn.LeakyReLU(0.2, True), nn.ReLU(True)
        if outermost:
            upconv = PiggybackConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = PiggybackConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, make_norm(outer_nc)]
        else:
            upconv = PiggybackConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=use_bias)
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
    ):
        super().__init__()
        kw = dict(norm=norm)
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

    Every conv / transposed conv is a piggyback layer. `cfg.lam_overrides` is checked against the network
    here (an unknown layer name or a group the architecture lacks is an error naming the key). The config
    is kept as `net.config`.
    """
    common = dict(ngf=cfg.ngf, norm=cfg.norm, use_dropout=cfg.use_dropout)
    if cfg.netG.startswith("resnet_"):
        net = ResnetGenerator(cfg.input_nc, cfg.output_nc, n_blocks=int(cfg.netG[7]), **common)
    else:
        net = UnetGenerator(cfg.input_nc, cfg.output_nc, num_downs={"unet_128": 7, "unet_256": 8}[cfg.netG], **common)
    net.config = cfg
    resolve_layer_lams(cfg, net)
    return net


def piggyback_layer_names(net: nn.Module) -> list[str]:
    """Names of the piggyback layers in module order: the first reads the input, the last writes the output."""
    return [n for n, m in net.named_modules() if isinstance(m, PIGGYBACK_LAYERS)]


def layer_groups(net: nn.Module) -> dict[str, str]:
    """{piggyback layer name: group}: "first" (reads the input), "last" (writes the output), "up" (the other
    transposed convs), "blocks" (convs inside ResNet blocks) and "down" (every other conv)."""
    in_blocks = {f"{n}.{c}" for n, m in net.named_modules() if isinstance(m, ResnetBlock)
                 for c, _ in m.named_modules() if c}
    modules = dict(net.named_modules())
    groups = {name: ("up" if isinstance(modules[name], PiggybackConvTranspose2d) else "blocks" if name in in_blocks
                     else "down") for name in piggyback_layer_names(net)}
    names = list(groups)
    groups[names[0]], groups[names[-1]] = "first", "last"
    return groups


def resolve_layer_lams(cfg: GeneratorConfig, net: nn.Module, task_lam: Optional[float] = None) -> dict[str, float]:
    """Lambda of every piggyback layer of `net` for a new task: the one place per-layer lambdas are decided.

    Precedence: an override naming the layer exactly, then one naming its group (`layer_groups`), then
    the task's own lambda (`task_lam`, tasks.<id>.lam), then `cfg.lam`. An override naming no layer of this
    network is a ValueError naming the key.
    """
    groups = layer_groups(net)
    for key in cfg.lam_overrides:
        if key not in groups and key not in groups.values():
            what = "has no layer in group" if key in LAYER_GROUPS else "has no piggyback layer named"
            names = list(groups)
            raise ValueError(f"lam_overrides.{key}: {cfg.netG} {what} {key!r} (groups: {', '.join(LAYER_GROUPS)}; "
                             f"layer names: {names[0]!r} ... {names[-1]!r})")
    default = cfg.lam if task_lam is None else task_lam
    return {name: cfg.lam_overrides.get(name, cfg.lam_overrides.get(group, default)) for name, group in groups.items()}
