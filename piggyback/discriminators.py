"""Discriminators: junyanz's PatchGAN (NLayerDiscriminator) and PixelGAN, plain convolutions.

Layout, bias rule and init follow junyanz/pytorch-CycleGAN-and-pix2pix `models/networks.py`
(junyanz `models/networks.py`). Discriminators are not piggybacked (docs/method.md): each task builds
a fresh one and discards it afterwards. Their convolutions are `convkernels.Conv2d`: nn.Conv2d with the
same parameters and state dict, whose training-time kernel follows `train.conv_kernels`; their batch norm
is `norms.BatchNorm2d`: nn.BatchNorm2d that can keep the statistics of calls batched together apart.
"""
from __future__ import annotations

from torch import Tensor, nn

from .convkernels import Conv2d
from .norms import BatchNorm2d

DISCRIMINATORS = ("basic", "n_layers", "pixel")


def _plain_norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return BatchNorm2d(channels, affine=True, track_running_stats=True)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 70x70 receptive field for n_layers=3; (B, C, 256, 256) -> (B, 1, 30, 30) logits (no sigmoid)."""

    def __init__(
        self,
        input_nc: int,                          # 3 (CycleGAN) or input_nc + output_nc (pix2pix, cat(A, B)).
        ndf: int = 64,                          # Filters of the first conv.
        n_layers: int = 3,                      # Stride-2 convs after the first.
        norm: str = "batch",                    # batch | instance | none
    ):
        super().__init__()
        use_bias = norm == "instance"           # junyanz: no bias before a BatchNorm (or none)
        seq = [Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=use_bias), _plain_norm(norm, ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=use_bias), _plain_norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True), Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.model = nn.Sequential(*seq)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1x1 PixelGAN: (B, C, H, W) -> (B, 1, H, W) logits."""

    def __init__(self, input_nc: int, ndf: int = 64, norm: str = "batch"):
        super().__init__()
        use_bias = norm == "instance"
        self.net = nn.Sequential(
            Conv2d(input_nc, ndf, 1), nn.LeakyReLU(0.2, True),
            Conv2d(ndf, ndf * 2, 1, bias=use_bias), _plain_norm(norm, ndf * 2), nn.LeakyReLU(0.2, True),
            Conv2d(ndf * 2, 1, 1, bias=use_bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """junyanz init_weights('normal'): conv weights ~ N(0, gain), biases 0; BatchNorm weight ~ N(1, gain), bias 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


def build_discriminator(netD: str, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> nn.Module:
    """A fresh, initialised discriminator: netD = basic (PatchGAN, 3 layers) | n_layers | pixel."""
    if netD == "basic":
        net = NLayerDiscriminator(input_nc, ndf, 3, norm)
    elif netD == "n_layers":
        net = NLayerDiscriminator(input_nc, ndf, n_layers, norm)
    elif netD == "pixel":
        net = PixelDiscriminator(input_nc, ndf, norm)
    else:
        raise ValueError(f"netD: {netD!r} is not one of {list(DISCRIMINATORS)}")
    return init_weights(net)
