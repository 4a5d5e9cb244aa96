"""Which kernel runs a piggyback layer's convolution while training (`train.conv_kernels`).

`direct` calls F.conv2d / F.conv_transpose2d (oneDNN on the CPU, cuDNN on a GPU) everywhere. `auto`
(the default) takes, on the CPU, a kernel measured faster for the same sums where one exists:

- `winograd`: the 3x3 stride-1 convolutions of wide layers (the ResNet blocks: 256 channels) by
  Winograd minimal filtering F(4x4, 3x3), piggyback/fastconv.py: 4x fewer multiplications; at least 128
  channels in and out and enough tiles (`fastconv.worthwhile`), below that the transforms cost more
  than they save.
- `gemm`: a convolution whose output (or, transposed, whose input) has only a few pixels but whose
  weight is large (the inner layers of a U-Net: 512 x 512 x 4 x 4 filters on 1x1 to 8x8 maps), where
  oneDNN spends most of the time outside the multiply-adds: the same linear map as one matrix product
  over unfolded patches (im2col; col2im for the transposed convolution), forward and backward through
  autograd.

Both compute the same convolution with the sums in another order: equal to the direct kernel within
float tolerance (tests/test_fastconv.py, tests/test_convkernels.py, tests/test_step_equality.py), not
bit-identical, so the choice is a params key. They apply only while gradients are recorded (training
steps): evaluation, probes, audit and serving run the direct kernel, so a checkpoint's recorded probes
reproduce bit for bit whatever the setting. The choice depends only on shapes, dtype and device, never
on timing, so a run is as deterministic as before; the embedded suite's narrow networks (ngf 16, maps of
16x16 and more) take `direct` everywhere, so its published numbers are unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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
    if not transposed and fastconv.supported(x, weight, stride, padding) and fastconv.worthwhile(x, weight):
        return "winograd"
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.numel() >= GEMM_MIN_WEIGHT
            and _columns(x, out_hw, transposed) <= GEMM_MAX_COLUMNS["transposed" if transposed else "conv"]):
        return "gemm"
    return "direct"


def _columns(x: Tensor, out_hw: Callable[[int, int], tuple[int, int]], transposed: bool) -> int:
    """The matrix product's columns for input `x` (N, C, H, W): N x output pixels (transposed: input pixels)."""
    n, _, h, w = x.shape
    if transposed:
        return n * h * w
    ho, wo = out_hw(h, w)
    return n * ho * wo


def conv2d_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                padding: Sequence[int]) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) (dilation 1, groups 1) as weight @ im2col(x)."""
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), padding=tuple(padding), stride=tuple(stride))      # (N, C*kh*kw, L)
    y = torch.matmul(weight.reshape(o, -1), cols).view(n, o, ho, wo)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv_transpose2d_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                          padding: Sequence[int], output_padding: Sequence[int]) -> Tensor:
    """F.conv_transpose2d (dilation 1, groups 1; weight (C_in, C_out, kh, kw)) as col2im(weight^T @ x)."""
    n, c, h, w = x.shape
    _, o, kh, kw = weight.shape
    ho = (h - 1) * stride[0] - 2 * padding[0] + kh + output_padding[0]
    wo = (w - 1) * stride[1] - 2 * padding[1] + kw + output_padding[1]
    cols = torch.matmul(weight.reshape(c, o * kh * kw).t(), x.reshape(n, c, h * w))  # (N, C_out*kh*kw, H*W)
    y = F.fold(cols, (ho, wo), (kh, kw), padding=tuple(padding), stride=tuple(stride))
    return y if bias is None else y + bias.view(1, -1, 1, 1)
