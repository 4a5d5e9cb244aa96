"""Winograd minimal filtering for the 3x3 stride-1 convolutions of the residual blocks (train.conv3x3).

F(m x m, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes an
m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2 multiplications per (input, output)
channel pair instead of 9 m^2: 2.25x fewer for m = 2, 4x fewer for m = 4. With a = (m+2)^2 components,

    V = B^T d B     (input tiles,   kept as (a, C, tiles))
    U = G g G^T     (filters,       kept as (a, K, C))
    M[i] = U[i] @ V[i]              one batched matmul over the a components
    y = A^T M A     (output tiles,  overlap-free)

The backward pass stays in the Winograd domain: dM = A dY A^T, dV = U^T dM, dU = dM V^T, then
dg = G^T dU G and dx = B dV B^T overlap-added onto the (overlapping) input tiles. Each 2-D transform
applies the Kronecker product of the 1-D matrices at once, as one matmul (the component axis against one
long axis of channels x tiles) or, for the input tiles, as a strided convolution with fixed filters.
V and U come out in layouts whose (C, tiles) and (K, C) matrices the batched matmul reads in place.

Measured on a 2-core Zen 4 against oneDNN's direct convolution (forward + backward, batch 1, 256
channels): 0.71x at 32x32 output, 0.54x-0.59x at 64x64. At 32x32 the three batched matmuls take ~6.5 ms
and the transforms ~5-6 ms (memory-bound plain PyTorch ops, no fused kernel); the ~25 MB of temporaries
make it sensitive to the allocator: in iterations where glibc has trimmed its heap and the pages fault
back in, it takes ~40 % longer (medians of 0.83x seen). Narrow layers or small maps are not faster than
direct: see `worthwhile`.

Only float32/float64 CPU tensors with a 3x3 kernel, stride 1, dilation 1, groups 1 and padding 0 take
this path (the callers pad); anything else falls back to F.conv2d. The result equals F.conv2d up to float
rounding: the transforms change the order and the intermediate values of the sums (about 1e-6 of max |y|
for m = 4 in float32, exact to rounding in float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

TILES = (2, 4)

# 1-D transforms of F(m, 3) with interpolation points 0, +-1 (, +-2), infinity (Lavin & Gray, section 4).
_MATRICES = {
    2: dict(
        BT=[[1, 0, -1, 0],
            [0, 1, 1, 0],
            [0, -1, 1, 0],
            [0, 1, 0, -1]],
        G=[[1, 0, 0],
           [1 / 2, 1 / 2, 1 / 2],
           [1 / 2, -1 / 2, 1 / 2],
           [0, 0, 1]],
        AT=[[1, 1, 1, 0],
            [0, 1, -1, -1]],
    ),
    4: dict(
        BT=[[4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1]],
        G=[[1 / 4, 0, 0],
           [-1 / 6, -1 / 6, -1 / 6],
           [-1 / 6, 1 / 6, -1 / 6],
           [1 / 24, 1 / 12, 1 / 6],
           [1 / 24, -1 / 12, 1 / 6],
           [0, 0, 1]],
        AT=[[1, 1, 1, 1, 1, 0],
            [0, 1, -1, 2, -2, 0],
            [0, 1, 1, 4, 4, 0],
            [0, 1, -1, 8, -8, 1]],
    ),
}
_KRON_CACHE: dict = {}


def _kron(tile: int, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """kron(M, M) of the 1-D matrix `name` of F(tile, 3): the 2-D transform X -> M X M^T as one matmul
    on X flattened row-major. Computed in float64, then rounded once to `dtype`."""
    key = (tile, name, dtype, device)
    if key not in _KRON_CACHE:
        m = torch.tensor(_MATRICES[tile][name], dtype=torch.float64)
        _KRON_CACHE[key] = torch.kron(m, m).to(dtype=dtype, device=device).contiguous()
    return _KRON_CACHE[key]


def _all(value, k: int) -> bool:
    """An int or pair (or F.conv2d's "valid" padding, which is 0) that is k in every direction."""
    if isinstance(value, str):
        return value == "valid" and k == 0
    return all(int(v) == k for v in (value if isinstance(value, (tuple, list)) else (value,)))


def supported(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups=1) -> bool:
    """True where `winograd_conv3x3` computes the convolution itself rather than calling F.conv2d."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() == 4 and weight.dim() == 4
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and tuple(weight.shape[2:]) == (3, 3) and weight.shape[1] == x.shape[1]
            and x.shape[2] >= 3 and x.shape[3] >= 3
            and groups == 1 and _all(stride, 1) and _all(padding, 0) and _all(dilation, 1)
            and not torch.is_autocast_enabled("cpu"))


def choose_tile(x: Tensor, weight: Tensor) -> int:
    """F(4x4, 3x3) (measured faster than F(2x2, 3x3) at every shape tried) unless the output is smaller
    than one 4x4 tile in a direction."""
    return 4 if min(x.shape[2], x.shape[3]) - 2 >= 4 else 2


def worthwhile(x: Tensor, weight: Tensor) -> bool:
    """Whether Winograd is expected to beat F.conv2d for forward + backward at this shape (`supported` aside).

    The batched matmul shrinks 4x, but the transforms cost memory traffic of the order of (C + K) per tile
    and 36 K C for the filters, which only enough channels and tiles pay for. Measured on a 2-core Zen 4
    (float32, batch 1, forward + backward, F(4x4, 3x3) / F.conv2d, median of interleaved rounds): 256
    channels 0.71x-0.83x at 32x32 output, 0.54x-0.59x at 64x64, 1.56x at 16x16; 128 channels 0.86x at
    64x64, 0.95x at 32x32; 64 channels 0.98x-1.18x from 32x32 to 128x128. Hence: at least 128 channels
    in and out, and at least 16384 (tile, channel) pairs over the batch (256 channels: 64 tiles, a 32x32
    output; 128 channels: 128 tiles).
    """
    channels = min(x.shape[1], weight.shape[0])
    tiles = x.shape[0] * -(-(x.shape[2] - 2) // 4) * -(-(x.shape[3] - 2) // 4)
    return channels >= 128 and tiles * channels >= 16384


# -- weight transform -----------------------------------------------------------------------------------
def _weight_forward(weight: Tensor, tile: int) -> Tensor:
    """U = G g G^T for every (K, C) filter: (K, C, 3, 3) -> (a, K, C), stored as (K, a, C).

    One small matmul per output filter, (a, 9) @ (9, C), reads the weight in its own layout; the
    batched matmul of the convolution takes the (a, K, C) view as it is (its rows are C-contiguous)."""
    k, c = weight.shape[:2]
    gk = _kron(tile, "G", weight.dtype, weight.device)
    return torch.bmm(gk.expand(k, *gk.shape), weight.reshape(k, c, 9).transpose(1, 2)).transpose(0, 1)


def _weight_backward(grad_u: Tensor, tile: int, k: int, c: int) -> Tensor:
    """dg = G^T dU G: (a, K, C) -> (K, C, 3, 3), as one (9, a) @ (a, C) matmul per output filter."""
    gk = _kron(tile, "G", grad_u.dtype, grad_u.device)
    dg = torch.bmm(gk.t().expand(k, *gk.t().shape), grad_u.transpose(0, 1))          # (K, 9, C)
    return dg.transpose(1, 2).reshape(k, c, 3, 3)


class _WinogradWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, tile: int) -> Tensor:
        ctx.tile, ctx.kc = tile, tuple(weight.shape[:2])
        return _weight_forward(weight, tile)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u: Tensor):
        return _weight_backward(grad_u, ctx.tile, *ctx.kc), None


def winograd_weight(weight: Tensor, tile: int) -> Tensor:
    """The transformed filters U (a, K, C) of a (K, C, 3, 3) weight, differentiable.

    Pass it as `transformed=` to several `winograd_conv3x3` calls with the same weight: the transform then
    runs once forward and once backward (autograd sums the calls' dU first)."""
    if tile not in TILES:
        raise ValueError(f"tile must be one of {TILES}, got {tile!r}")
    return _WinogradWeight.apply(weight, tile)


# -- the convolution ------------------------------------------------------------------------------------
def _tiles(h: int, w: int, tile: int) -> tuple[int, int]:
    return -(-(h - 2) // tile), -(-(w - 2) // tile)


def _input_forward(x: Tensor, tile: int) -> Tensor:
    """V = B^T d B for every input tile: (N, C, H, W) -> (a, C, N * th * tw), stored as (C, a, N * th * tw).

    The transform of all tiles of one channel is a convolution of that channel with a fixed filters of
    size (tile+2)^2 at stride `tile` (filter i is row i of kron(B^T, B^T)): oneDNN reads the overlapping
    tiles in place, with no gather copy (measured 2x faster than gather + matmul). A batch is a depth axis
    (conv3d), which keeps each component's (C, N * tiles) matrix in one piece."""
    n, c, h, w = x.shape
    th, tw = _tiles(h, w, tile)
    hp, wp = tile * th + 2, tile * tw + 2
    if (hp, wp) != (h, w):                                  # zero rows/columns complete the last tiles
        x = F.pad(x, (0, wp - w, 0, hp - h))
    alpha = tile + 2
    filters = _kron(tile, "BT", x.dtype, x.device).view(alpha * alpha, 1, alpha, alpha)
    if n == 1:
        v = F.conv2d(x.transpose(0, 1), filters, stride=tile)                            # (C, a, th, tw)
    else:
        v = F.conv3d(x.transpose(0, 1).unsqueeze(1), filters.unsqueeze(2), stride=(1, tile, tile))  # (C,a,N,th,tw)
    return v.reshape(c, alpha * alpha, n * th * tw).transpose(0, 1)


def _input_backward(grad_v: Tensor, tile: int, shape: tuple[int, int, int, int]) -> Tensor:
    """dx = B dV B^T overlap-added onto the input tiles: (a, C, N * th * tw) -> (N, C, H, W)."""
    n, c, h, w = shape
    th, tw = _tiles(h, w, tile)
    alpha = tile + 2
    bk = _kron(tile, "BT", grad_v.dtype, grad_v.device)
    dd = torch.mm(bk.t(), grad_v.reshape(alpha * alpha, -1)).view(alpha, alpha, c, n, th, tw)
    dd = dd.permute(3, 2, 4, 0, 5, 1)                        # (N, C, th, i, tw, j)
    hp, wp = tile * th + 2, tile * tw + 2                   # the (padded) input the tiles cover
    dx = torch.empty((n, c, hp, wp), dtype=grad_v.dtype, device=grad_v.device)
    dx[:, :, tile * th:].zero_()                            # the last 2 rows and columns get only the
    dx[:, :, :tile * th, tile * tw:].zero_()                # overlap adds below
    sn, sc, sh, sw = dx.stride()

    def tiles(r0: int, c0: int, rows: int, cols: int) -> Tensor:
        """(N, C, th, rows, tw, cols) view: pixel (r0 + i, c0 + j) of every tile."""
        return dx.as_strided((n, c, th, rows, tw, cols), (sn, sc, tile * sh, sh, tile * sw, sw), r0 * sh + c0 * sw)
    tiles(0, 0, tile, tile).copy_(dd[:, :, :, :tile, :, :tile])    # each pixel of the tiled area once
    tiles(0, tile, tile, 2).add_(dd[:, :, :, :tile, :, tile:])     # the 2 columns shared with the next tile
    tiles(tile, 0, 2, tile).add_(dd[:, :, :, tile:, :, :tile])     # the 2 rows shared with the next tile
    tiles(tile, tile, 2, 2).add_(dd[:, :, :, tile:, :, tile:])     # the corners
    return dx if (hp, wp) == (h, w) else dx[:, :, :h, :w].contiguous()


def _output_forward(m: Tensor, tile: int, n: int, ho: int, wo: int, bias: Optional[Tensor]) -> Tensor:
    """y = A^T M A (+ bias): (a, K, N * th * tw) -> (N, K, ho, wo)."""
    alpha, k = tile + 2, m.shape[1]
    th, tw = -(-ho // tile), -(-wo // tile)
    yt = torch.mm(_kron(tile, "AT", m.dtype, m.device), m.view(alpha * alpha, -1))
    yt = yt.view(tile, tile, k, n, th, tw).permute(3, 2, 4, 0, 5, 1)   # (N, K, th, i, tw, j)
    y = torch.empty((n, k, th * tile, tw * tile), dtype=m.dtype, device=m.device)
    view = y.view(n, k, th, tile, tw, tile)
    if bias is None:
        view.copy_(yt)
    else:
        torch.add(yt, bias.view(1, k, 1, 1, 1, 1), out=view)
    if (th * tile, tw * tile) != (ho, wo):
        y = y[:, :, :ho, :wo].contiguous()
    return y


def _output_backward(grad_y: Tensor, tile: int) -> Tensor:
    """dM = A dY A^T: (N, K, ho, wo) -> (a, K, N * th * tw)."""
    n, k, ho, wo = grad_y.shape
    th, tw = -(-ho // tile), -(-wo // tile)
    if (th * tile, tw * tile) != (ho, wo):
        grad_y = F.pad(grad_y, (0, tw * tile - wo, 0, th * tile - ho))
    dy = grad_y.reshape(n, k, th, tile, tw, tile).permute(3, 5, 1, 0, 2, 4).reshape(tile * tile, -1)
    return torch.mm(_kron(tile, "AT", grad_y.dtype, grad_y.device).t(), dy).view(-1, k, n * th * tw)


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, bias: Optional[Tensor], tile: int) -> Tensor:
        n, _, h, w = x.shape
        v = _input_forward(x, tile)                          # (a, C, T)
        m = torch.bmm(u, v)                                  # (a, K, T)
        ctx.tile, ctx.shape, ctx.has_bias = tile, tuple(x.shape), bias is not None
        ctx.save_for_backward(u, v)
        return _output_forward(m, tile, n, h - 2, w - 2, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        u, v = ctx.saved_tensors
        need_x, need_u, need_b = ctx.needs_input_grad[:3]
        dm = _output_backward(grad_y, ctx.tile)              # (a, K, T)
        dx = _input_backward(torch.bmm(u.transpose(1, 2), dm), ctx.tile, ctx.shape) if need_x else None
        du = torch.bmm(dm, v.transpose(1, 2)) if need_u else None
        db = grad_y.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return dx, du, db, None


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     dilation=1, groups=1, tile: Optional[int] = None,
                     transformed: Optional[Tensor] = None) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups), by Winograd F(tile x tile, 3 x 3) where
    `supported` (else exactly F.conv2d). `tile`: 2 or 4 (None: `choose_tile`). `transformed`: the output of
    `winograd_weight(weight, tile)`, to share one weight transform between calls."""
    if not supported(x, weight, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if tile is None:
        tile = choose_tile(x, weight)
    u = winograd_weight(weight, tile) if transformed is None else transformed
    if u.shape != ((tile + 2) ** 2, weight.shape[0], weight.shape[1]):
        raise ValueError(f"transformed weight {tuple(u.shape)} does not match F({tile}, 3) "
                         f"of {tuple(weight.shape)}")
    return _WinogradConv.apply(x, u, bias, tile)
