"""Which kernel runs a convolution while training (`train.conv_kernels`): the generators' piggyback
layers and the discriminators' `Conv2d`.

`direct` calls F.conv2d / F.conv_transpose2d (oneDNN on the CPU, cuDNN on a GPU) everywhere. `auto`
(the default) takes, on the CPU, a kernel measured faster for the same sums where one exists:

- `winograd`: stride-1 convolutions of wide layers by Winograd minimal filtering, piggyback/fastconv.py:
  F(4x4, 3x3) for the ResNet blocks' 3x3 layers (256 channels; 4x fewer multiplications) and F(4x4, 4x4)
  for the PatchGAN's 4x4 stride-1 layer (256 -> 512 at 256x256 input; 5.2x fewer); at least 128
  channels in and out and enough tiles (`fastconv.worthwhile`), below that the transforms cost more
  than they save. (Its stride-2 layers by space-to-depth and F(4x4, 2x2) measured 1.2x-4x slower than
  oneDNN, so they stay direct.)
- `gemm`: a convolution whose output (or, transposed, whose input) has only a few pixels but whose
  weight is large (the inner layers of a U-Net: 512 x 512 x 4 x 4 filters on 1x1 to 8x8 maps), where
  oneDNN spends most of the time outside the multiply-adds: the same linear map as one matrix product
  over unfolded patches (im2col; col2im for the transposed convolution), each product in the faster
  orientation for its shape.

Both compute the same convolution with the sums in another order: equal to the direct kernel within
float tolerance (tests/test_fastconv.py, tests/test_convkernels.py, tests/test_step_equality.py), not
bit-identical, so the choice is a params key. They apply only while gradients are recorded (training
steps): evaluation, probes, audit and serving run the direct kernel, so a checkpoint's recorded probes
reproduce bit for bit whatever the setting. The choice depends only on shapes, dtype and device, never
on timing, so a run is as deterministic as before; the embedded suite's narrow networks (ngf and ndf
16) take `direct` everywhere, so its published numbers are unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import fastconv

KERNELS = ("direct", "auto")

#: Where the matrix product is used: few GEMM columns (batch x output pixels of a convolution, batch x
#: input pixels of a transposed one) and a weight of at least GEMM_MIN_WEIGHT elements (256 x 256 x 4 x 4;
#: small weights are no trouble for oneDNN). Measured on the U-Net's inner layers (2-core Zen 4, forward +
#: backward, interleaved rounds, matrix product / oneDNN): 512->512 4x4 stride-2 convolutions 0.5-0.74 at
#: 1 to 64 columns; 1024->512 transposed 0.14-0.68 at 1 to 64 columns, 1024->256 0.77 at 256; but 0.99
#: for 256->512 at 64 columns and 0.9-1.0 for transposed ones at 1024 columns.
GEMM_MAX_COLUMNS = {"conv": 64, "transposed": 256}
GEMM_MIN_WEIGHT = 1 << 20


def choose_kernel(kernels: str, x: Tensor, weight: Tensor, stride, padding,
                  out_hw: Callable[[int, int], tuple[int, int]], transposed: bool = False) -> str:
    """`direct`, `winograd` or `gemm` for a layer set to `kernels` convolving `x` with `weight`
    (`out_hw(h, w)`: the layer's output size)."""
    if kernels != "auto" or not torch.is_grad_enabled() or x.dim() != 4:
        return "direct"
    if (not transposed and fastconv.supported(x, weight, stride, padding)
            and fastconv.worthwhile(x, weight, fastconv.uniform(padding))):
        return "winograd"
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.numel() >= GEMM_MIN_WEIGHT
            and _columns(x, out_hw, transposed) <= GEMM_MAX_COLUMNS["transposed" if transposed else "conv"]):
        return "gemm"
    return "direct"


def conv2d(kernels: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], transform: Optional[Callable[[int], Optional[Tensor]]] = None) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) by the kernel `choose_kernel` picks for `kernels`.
    `transform(tile)`: a kept `fastconv.winograd_weight(weight, tile)`, or None to transform here."""
    def out_hw(h: int, w: int) -> tuple[int, int]:
        return tuple((size + 2 * p - k) // s + 1 for size, p, k, s in zip((h, w), padding, weight.shape[2:], stride))
    kernel = choose_kernel(kernels, x, weight, stride, padding, out_hw)
    if kernel == "winograd":
        tile = fastconv.choose_tile(x, weight, fastconv.uniform(padding))
        transformed = transform(tile) if transform is not None else None
        return fastconv.winograd_conv2d(x, weight, bias, padding=padding, tile=tile, transformed=transformed)
    if kernel == "gemm":
        return conv2d_gemm(x, weight, bias, stride, padding)
    return F.conv2d(x, weight, bias, stride, padding)


def conv_transpose2d(kernels: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], output_padding: Sequence[int]) -> Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding, output_padding) by the kernel `choose_kernel`
    picks for `kernels` (`direct` or `gemm`)."""
    def out_hw(h: int, w: int) -> tuple[int, int]:
        return tuple((size - 1) * s - 2 * p + k + op for size, s, p, k, op
                     in zip((h, w), stride, padding, weight.shape[2:], output_padding))
    if choose_kernel(kernels, x, weight, stride, padding, out_hw, transposed=True) == "gemm":
        return conv_transpose2d_gemm(x, weight, bias, stride, padding, output_padding)
    return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)


def kept_transform(cache: Optional[dict], key: tuple, weight: Tensor, tile: int) -> Optional[Tensor]:
    """fastconv.winograd_weight(weight, tile), computed once per cache scope: kept in `cache` under `key`
    and the grad and autocast modes; None outside a scope (`cache` None): the caller transforms."""
    if cache is None:
        return None
    full = (*key, torch.is_grad_enabled(), torch.is_autocast_enabled(), "winograd", tile)
    if full not in cache:
        cache[full] = fastconv.winograd_weight(weight, tile)
    return cache[full]


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state dict) whose training-time kernel follows `conv_kernels`,
    like the piggyback layers: the discriminators' convolutions. Zero padding only (as nn.Conv2d's
    default); dilation and groups must be 1."""

    conv_kernels = "direct"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or self.dilation != (1, 1) or self.groups != 1 or isinstance(self.padding, str):
            raise ValueError("convkernels.Conv2d supports integer zero padding, dilation 1 and groups 1 only")
        self._weight_cache: Optional[dict] = None

    def cache_composed_weights(self, enabled: bool) -> None:
        """Start (True) or end (False) a scope in which the weight's Winograd transform is computed once
        however often the layer is called (`lifelong.reuse_composed_weights`: a discriminator judging the
        real and the fake batch in two calls). End it before the optimiser step."""
        self._weight_cache = {} if enabled else None

    def _transformed(self, tile: int) -> Optional[Tensor]:
        return kept_transform(self._weight_cache, (), self.weight, tile)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(self.conv_kernels, x, self.weight, self.bias, self.stride, self.padding, self._transformed)


def set_conv_kernels(net: nn.Module, kernels: str) -> None:
    """Every layer of `net` with a training-time kernel switch (the piggyback layers, `Conv2d`) convolves
    with `kernels` while training."""
    if kernels not in KERNELS:
        raise ValueError(f"train.conv_kernels must be one of {KERNELS}, got {kernels!r}")
    for m in net.modules():
        if isinstance(getattr(type(m), "conv_kernels", None), str):
            m.conv_kernels = kernels


def _columns(x: Tensor, out_hw: Callable[[int, int], tuple[int, int]], transposed: bool) -> int:
    """The matrix product's columns for input `x` (N, C, H, W): N x output pixels (transposed: input pixels)."""
    n, _, h, w = x.shape
    if transposed:
        return n * h * w
    ho, wo = out_hw(h, w)
    return n * ho * wo


#: Below this many columns a product with a transposed weight, W^T @ X, is computed as (X^T @ W)^T: the
#: matrix kernel streams a transposed W badly when X is thin. Measured (2-core Zen 4, W 1024 x 10240):
#: 19.5 ms vs 6.1 ms at 4 columns; equal (10.3 vs 11.4 ms) at 64.
THIN_COLUMNS = 32


def _batch_outer(a: Tensor, b: Tensor) -> Tensor:
    """sum over n of a[n] @ b[n]^T for a (N, M, L), b (N, K, L): (M, K), one matrix product."""
    if a.shape[0] == 1:
        return torch.mm(a[0], b[0].t())
    return torch.mm(a.transpose(0, 1).reshape(a.shape[1], -1), b.transpose(0, 1).reshape(b.shape[1], -1).t())


def _t_mm(w: Tensor, x: Tensor) -> Tensor:
    """w^T @ x for w (M, K) and x (N, M, L): (N, K, L), in the orientation that is faster for L."""
    if x.shape[-1] <= THIN_COLUMNS:
        return torch.matmul(x.transpose(1, 2), w).transpose(1, 2)
    return torch.matmul(w.t(), x)


class _WeightTimesCols(torch.autograd.Function):
    """y = w @ cols for w (M, K), cols (N, K, L), with the backward's w^T @ dy by `_t_mm`."""

    @staticmethod
    def forward(ctx, w: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(w, cols)
        return torch.matmul(w, cols)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        w, cols = ctx.saved_tensors
        dw = _batch_outer(dy, cols) if ctx.needs_input_grad[0] else None
        dcols = _t_mm(w, dy) if ctx.needs_input_grad[1] else None
        return dw, dcols


class _WeightTTimesX(torch.autograd.Function):
    """cols = w^T @ x for w (M, K), x (N, M, L), by `_t_mm`."""

    @staticmethod
    def forward(ctx, w: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(w, x)
        return _t_mm(w, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dcols: Tensor):
        w, x = ctx.saved_tensors
        dw = _batch_outer(x, dcols) if ctx.needs_input_grad[0] else None
        dx = torch.matmul(w, dcols) if ctx.needs_input_grad[1] else None
        return dw, dx


def conv2d_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                padding: Sequence[int]) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) (dilation 1, groups 1) as weight @ im2col(x)."""
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), padding=tuple(padding), stride=tuple(stride))      # (N, C*kh*kw, L)
    y = _WeightTimesCols.apply(weight.reshape(o, -1), cols).view(n, o, ho, wo)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv_transpose2d_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                          padding: Sequence[int], output_padding: Sequence[int]) -> Tensor:
    """F.conv_transpose2d (dilation 1, groups 1; weight (C_in, C_out, kh, kw)) as col2im(weight^T @ x)."""
    n, c, h, w = x.shape
    _, o, kh, kw = weight.shape
    ho = (h - 1) * stride[0] - 2 * padding[0] + kh + output_padding[0]
    wo = (w - 1) * stride[1] - 2 * padding[1] + kw + output_padding[1]
    cols = _WeightTTimesX.apply(weight.reshape(c, o * kh * kw), x.reshape(n, c, h * w))  # (N, C_out*kh*kw, H*W)
    y = F.fold(cols, (ho, wo), (kh, kw), padding=tuple(padding), stride=tuple(stride))
    return y if bias is None else y + bias.view(1, -1, 1, 1)
