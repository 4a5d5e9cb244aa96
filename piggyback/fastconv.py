"""Winograd minimal filtering for stride-1 convolutions (`train.conv_kernels: auto`): the 3x3 layers of
the ResNet blocks and the PatchGAN's 4x4 stride-1 layer.

F(m x m, r x r) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes an
m x m output tile from an (m+r-1) x (m+r-1) input tile with (m+r-1)^2 multiplications per (input,
output) channel pair instead of r^2 m^2: 4x fewer for F(4x4, 3x3), 5.2x for F(4x4, 4x4). With
a = (m+r-1)^2 components,

    V = B^T d B     (input tiles,   kept as (a, C, tiles))
    U = G g G^T     (filters,       kept as (a, K, C))
    M[i] = U[i] @ V[i]              one batched matmul over the a components
    y = A^T M A     (output tiles,  overlap-free)

The 1-D matrices come from `matrices(m, r)`: Toom-Cook at the points 0, +-1, +-2, +-1/2 and infinity,
in exact rationals (F(4, 3) is the paper's), rounded once to the working dtype.

The backward pass stays in the Winograd domain: dM = A dY A^T, dV = U^T dM, dU = dM V^T, then
dg = G^T dU G and dx = B dV B^T overlap-added onto the (overlapping) input tiles. Each 2-D transform
applies the Kronecker product of the 1-D matrices at once, as one matmul (the component axis against one
long axis of channels x tiles) or, for the input tiles, as a strided convolution with fixed filters.
V and U come out in layouts whose (C, tiles) and (K, C) matrices the batched matmul reads in place.

Measured on a 2-core Zen 4 against oneDNN's direct convolution (forward + backward, batch 1):
F(4x4, 3x3) at 256 channels 0.71x at 32x32 output, 0.54x-0.59x at 64x64; F(4x4, 4x4) 256 -> 512 at
31x31 output 0.70x (F(3x3, 4x4) 0.80x). The transforms are memory-bound plain PyTorch ops (no fused
kernel) and their tens of MB of temporaries make the kernel sensitive to the allocator: where glibc has
trimmed its heap and the pages fault back in, it takes up to ~40 % longer (with freed memory kept, the
4x4 case is 0.61x). Narrow layers or small maps are not faster than direct: see `worthwhile`.

Only float32/float64 CPU tensors with a square kernel of a size in TILES, stride 1, dilation 1, groups 1
and an equal zero padding on every side take this path; anything else falls back to F.conv2d. The result
equals F.conv2d up to float rounding: the transforms change the order and the intermediate values of the
sums (a few 1e-6 of max |y| in float32, exact to rounding in float64).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Kernel sizes with a Winograd algorithm here, and the output tiles m of each F(m x m, r x r).
TILES = {3: (2, 4), 4: (3, 4)}

#: The interpolation points of F(m, r), one fewer than the tile's m + r - 1 values (the last is infinity):
#: small integers first, as in Lavin & Gray section 4 (their F(4, 3) matrices are what `matrices` returns).
_POINTS = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))
_MATRIX_CACHE: dict = {}
_KRON_CACHE: dict = {}


def matrices(m: int, r: int) -> dict[str, list[list[Fraction]]]:
    """The exact 1-D transforms BT (n x n), G (n x r) and AT (m x n), n = m + r - 1, of Winograd F(m, r):
    for a filter g (r) and an input segment d (n), AT ((G g) * (BT d)) is the correlation
    y_i = sum_k d_(i + k) g_k, i < m.

    Toom-Cook, transposed: with V the evaluation of a polynomial of degree n - 1 at the points and at
    infinity (its leading coefficient), and Vg, Vh the same for degrees r - 1 and m - 1, the linear
    convolution of g and h is V^-1 ((Vg g) * (Vh h)); the correlation is its transpose in h, so
    AT = Vh^T, G = Vg, BT = V^-T. Row j of G is divided, and row j of BT multiplied, by
    f_j = prod_(l != j) (p_j - p_l), which keeps BT integer. Exact rationals; callers round once."""
    key = (m, r)
    if key not in _MATRIX_CACHE:
        n = m + r - 1
        points = [Fraction(p) for p in _POINTS[:n - 1]]
        if len(points) != n - 1:
            raise ValueError(f"F({m}, {r}) needs {n - 1} interpolation points; {len(_POINTS)} are defined")

        def evaluation(degree: int) -> list[list[Fraction]]:
            return [[p ** k for k in range(degree)] for p in points] + [[Fraction(int(k == degree - 1)) for k in range(degree)]]
        v, vg, vh = evaluation(n), evaluation(r), evaluation(m)
        v_inv = _inverse(v)
        f = [_prod(p - q for i, q in enumerate(points) if i != j) for j, p in enumerate(points)] + [Fraction(1)]
        _MATRIX_CACHE[key] = dict(
            BT=[[v_inv[k][j] * f[j] for k in range(n)] for j in range(n)],
            G=[[vg[j][k] / f[j] for k in range(r)] for j in range(n)],
            AT=[[vh[j][i] for j in range(n)] for i in range(m)],
        )
    return _MATRIX_CACHE[key]


def _prod(values) -> Fraction:
    out = Fraction(1)
    for v in values:
        out *= v
    return out


def _inverse(a: list[list[Fraction]]) -> list[list[Fraction]]:
    """Gauss-Jordan inverse of a small nonsingular matrix of rationals (exact)."""
    n = len(a)
    rows = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(a)]
    for c in range(n):
        pivot = next(i for i in range(c, n) if rows[i][c] != 0)
        rows[c], rows[pivot] = rows[pivot], rows[c]
        rows[c] = [v / rows[c][c] for v in rows[c]]
        for i in range(n):
            if i != c and rows[i][c] != 0:
                rows[i] = [x - rows[i][c] * y for x, y in zip(rows[i], rows[c])]
    return [row[n:] for row in rows]


def _kron(tile: int, r: int, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """kron(M, M) of the 1-D matrix `name` of F(tile, r): the 2-D transform X -> M X M^T as one matmul
    on X flattened row-major. Computed in float64, then rounded once to `dtype`."""
    key = (tile, r, name, dtype, device)
    if key not in _KRON_CACHE:
        m = torch.tensor([[float(v) for v in row] for row in matrices(tile, r)[name]], dtype=torch.float64)
        _KRON_CACHE[key] = torch.kron(m, m).to(dtype=dtype, device=device).contiguous()
    return _KRON_CACHE[key]


def supported(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups=1) -> bool:
    """True where `winograd_conv2d` computes the convolution itself rather than calling F.conv2d: float32 or
    float64 on the CPU, a square kernel of a size in TILES, stride 1, no dilation or groups, an integer
    zero padding (the same on every side), and an input at least one kernel wide after padding."""
    r = weight.shape[-1] if weight.dim() == 4 else 0
    p = uniform(padding)
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() == 4 and weight.dim() == 4
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and r in TILES and weight.shape[2] == r and weight.shape[1] == x.shape[1]
            and p is not None and x.shape[2] + 2 * p >= r and x.shape[3] + 2 * p >= r
            and groups == 1 and uniform(stride) == 1 and uniform(dilation) == 1
            and not torch.is_autocast_enabled("cpu"))


def uniform(value) -> Optional[int]:
    """An int or pair of a stride, padding or dilation as one int if it is the same in every direction
    (F.conv2d's "valid" padding: 0), else None."""
    if isinstance(value, str):
        return 0 if value == "valid" else None
    values = {int(v) for v in (value if isinstance(value, (tuple, list)) else (value,))}
    return values.pop() if len(values) == 1 else None


def choose_tile(x: Tensor, weight: Tensor, padding: int = 0) -> int:
    """The larger output tile of TILES for this kernel size (measured faster at every shape tried),
    unless the output is smaller than one such tile in a direction."""
    r = weight.shape[-1]
    small, large = TILES[r]
    return large if min(x.shape[2], x.shape[3]) + 2 * padding - r + 1 >= large else small


def worthwhile(x: Tensor, weight: Tensor, padding: int = 0) -> bool:
    """Whether Winograd is expected to beat F.conv2d for forward + backward at this shape (`supported` aside).

    The batched matmul shrinks 4x-5x, but the transforms cost memory traffic of the order of (C + K) per tile
    and a K C per filter, which only enough channels and tiles pay for. Measured on a 2-core Zen 4
    (float32, batch 1, forward + backward, Winograd / F.conv2d, median of interleaved rounds):
    F(4x4, 3x3): 256 channels 0.71x-0.83x at 32x32 output, 0.54x-0.59x at 64x64, 1.56x at 16x16; 128
    channels 0.86x at 64x64, 0.95x at 32x32; 64 channels 0.98x-1.18x from 32x32 to 128x128.
    F(4x4, 4x4), the PatchGAN's 256 -> 512 layer: 0.70x at 31x31 output (64 tiles), 1.28x at 15x15.
    Hence: at least 128 channels in and out, and at least 16384 (tile, channel) pairs over the batch.
    """
    r = weight.shape[-1]
    tile = TILES[r][-1]
    channels = min(x.shape[1], weight.shape[0])
    th, tw = _tiles(x.shape[2] + 2 * padding, x.shape[3] + 2 * padding, tile, r)
    return channels >= 128 and x.shape[0] * th * tw * channels >= 16384


# -- weight transform -----------------------------------------------------------------------------------
def _weight_forward(weight: Tensor, tile: int) -> Tensor:
    """U = G g G^T for every (K, C) filter: (K, C, r, r) -> (a, K, C), stored as (K, a, C).

    One small matmul per output filter, (a, r^2) @ (r^2, C), reads the weight in its own layout; the
    batched matmul of the convolution takes the (a, K, C) view as it is (its rows are C-contiguous).
    Measured faster in the training iteration than one (a, r^2) @ (r^2, K C) matmul on the weight laid
    out tap-major (CycleGAN 0.75 vs 0.79 of the reference iteration, pix2pix 0.76 vs 0.78)."""
    k, c, r = weight.shape[0], weight.shape[1], weight.shape[-1]
    gk = _kron(tile, r, "G", weight.dtype, weight.device)
    return torch.bmm(gk.expand(k, *gk.shape), weight.reshape(k, c, r * r).transpose(1, 2)).transpose(0, 1)


def _weight_backward(grad_u: Tensor, tile: int, k: int, c: int, r: int) -> Tensor:
    """dg = G^T dU G: (a, K, C) -> (K, C, r, r), as one (r^2, a) @ (a, C) matmul per output filter."""
    gk = _kron(tile, r, "G", grad_u.dtype, grad_u.device)
    dg = torch.bmm(gk.t().expand(k, *gk.t().shape), grad_u.transpose(0, 1))          # (K, r^2, C)
    return dg.transpose(1, 2).reshape(k, c, r, r)


class _WinogradWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, tile: int) -> Tensor:
        ctx.tile, ctx.kcr = tile, (*weight.shape[:2], weight.shape[-1])
        return _weight_forward(weight, tile)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u: Tensor):
        return _weight_backward(grad_u, ctx.tile, *ctx.kcr), None


def winograd_weight(weight: Tensor, tile: int) -> Tensor:
    """The transformed filters U (a, K, C) of a (K, C, r, r) weight, differentiable.

    Pass it as `transformed=` to several `winograd_conv2d` calls with the same weight: the transform then
    runs once forward and once backward (autograd sums the calls' dU first)."""
    r = weight.shape[-1]
    if r not in TILES or tile not in TILES[r]:
        raise ValueError(f"tile must be one of {TILES.get(r, ())} for a {r}x{r} kernel, got {tile!r}")
    return _WinogradWeight.apply(weight, tile)


# -- the convolution ------------------------------------------------------------------------------------
def _tiles(h: int, w: int, tile: int, r: int) -> tuple[int, int]:
    """Output tiles (rows, columns) over an (h, w) input (after padding) for an r x r kernel."""
    return -(-(h - r + 1) // tile), -(-(w - r + 1) // tile)


def _input_forward(x: Tensor, tile: int, r: int) -> Tensor:
    """V = B^T d B for every input tile: (N, C, H, W) -> (a, C, N * th * tw), stored as (C, a, N * th * tw).

    The transform of all tiles of one channel is a convolution of that channel with a fixed filters of
    size (tile + r - 1)^2 at stride `tile` (filter i is row i of kron(B^T, B^T)): oneDNN reads the
    overlapping tiles in place, with no gather copy (measured 2x faster than gather + matmul). A batch is a
    depth axis (conv3d), which keeps each component's (C, N * tiles) matrix in one piece."""
    n, c, h, w = x.shape
    th, tw = _tiles(h, w, tile, r)
    hp, wp = tile * th + r - 1, tile * tw + r - 1
    if (hp, wp) != (h, w):                                  # zero rows/columns complete the last tiles
        x = F.pad(x, (0, wp - w, 0, hp - h))
    alpha = tile + r - 1
    filters = _kron(tile, r, "BT", x.dtype, x.device).view(alpha * alpha, 1, alpha, alpha)
    if n == 1:
        v = F.conv2d(x.transpose(0, 1), filters, stride=tile)                            # (C, a, th, tw)
    else:
        v = F.conv3d(x.transpose(0, 1).unsqueeze(1), filters.unsqueeze(2), stride=(1, tile, tile))  # (C,a,N,th,tw)
    return v.reshape(c, alpha * alpha, n * th * tw).transpose(0, 1)


def _input_backward(grad_v: Tensor, tile: int, r: int, shape: tuple[int, int, int, int]) -> Tensor:
    """dx = B dV B^T overlap-added onto the input tiles: (a, C, N * th * tw) -> (N, C, H, W).

    Neighbouring tiles share r - 1 rows (columns); `tile` >= r - 1 for every F(m, r) of TILES, so a pixel
    is in at most two tiles per direction: each tile's own block, then the shared strips, then the corners."""
    n, c, h, w = shape
    th, tw = _tiles(h, w, tile, r)
    alpha, o = tile + r - 1, r - 1
    bk = _kron(tile, r, "BT", grad_v.dtype, grad_v.device)
    dd = torch.mm(bk.t(), grad_v.reshape(alpha * alpha, -1)).view(alpha, alpha, c, n, th, tw)
    dd = dd.permute(3, 2, 4, 0, 5, 1)                        # (N, C, th, i, tw, j)
    hp, wp = tile * th + o, tile * tw + o                   # the (padded) input the tiles cover
    dx = torch.empty((n, c, hp, wp), dtype=grad_v.dtype, device=grad_v.device)
    dx[:, :, tile * th:].zero_()                            # the last r - 1 rows and columns get only
    dx[:, :, :tile * th, tile * tw:].zero_()                # the overlap adds below
    sn, sc, sh, sw = dx.stride()

    def tiles(r0: int, c0: int, rows: int, cols: int) -> Tensor:
        """(N, C, th, rows, tw, cols) view: pixel (r0 + i, c0 + j) of every tile."""
        return dx.as_strided((n, c, th, rows, tw, cols), (sn, sc, tile * sh, sh, tile * sw, sw), r0 * sh + c0 * sw)
    tiles(0, 0, tile, tile).copy_(dd[:, :, :, :tile, :, :tile])    # each pixel of the tiled area once
    tiles(0, tile, tile, o).add_(dd[:, :, :, :tile, :, tile:])     # the columns shared with the next tile
    tiles(tile, 0, o, tile).add_(dd[:, :, :, tile:, :, :tile])     # the rows shared with the next tile
    tiles(tile, tile, o, o).add_(dd[:, :, :, tile:, :, tile:])     # the corners
    return dx if (hp, wp) == (h, w) else dx[:, :, :h, :w].contiguous()


def _output_forward(m: Tensor, tile: int, r: int, n: int, ho: int, wo: int, bias: Optional[Tensor]) -> Tensor:
    """y = A^T M A (+ bias): (a, K, N * th * tw) -> (N, K, ho, wo)."""
    alpha, k = tile + r - 1, m.shape[1]
    th, tw = -(-ho // tile), -(-wo // tile)
    yt = torch.mm(_kron(tile, r, "AT", m.dtype, m.device), m.view(alpha * alpha, -1))
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


def _output_backward(grad_y: Tensor, tile: int, r: int) -> Tensor:
    """dM = A dY A^T: (N, K, ho, wo) -> (a, K, N * th * tw)."""
    n, k, ho, wo = grad_y.shape
    th, tw = -(-ho // tile), -(-wo // tile)
    if (th * tile, tw * tile) != (ho, wo):
        grad_y = F.pad(grad_y, (0, tw * tile - wo, 0, th * tile - ho))
    dy = grad_y.reshape(n, k, th, tile, tw, tile).permute(3, 5, 1, 0, 2, 4).reshape(tile * tile, -1)
    return torch.mm(_kron(tile, r, "AT", grad_y.dtype, grad_y.device).t(), dy).view(-1, k, n * th * tw)


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, bias: Optional[Tensor], tile: int, r: int) -> Tensor:
        n, _, h, w = x.shape
        v = _input_forward(x, tile, r)                       # (a, C, T)
        m = torch.bmm(u, v)                                  # (a, K, T)
        ctx.tile, ctx.r, ctx.shape, ctx.has_bias = tile, r, tuple(x.shape), bias is not None
        ctx.save_for_backward(u, v)
        return _output_forward(m, tile, r, n, h - r + 1, w - r + 1, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        u, v = ctx.saved_tensors
        need_x, need_u, need_b = ctx.needs_input_grad[:3]
        dm = _output_backward(grad_y, ctx.tile, ctx.r)       # (a, K, T)
        dx = _input_backward(torch.bmm(u.transpose(1, 2), dm), ctx.tile, ctx.r, ctx.shape) if need_x else None
        du = torch.bmm(dm, v.transpose(1, 2)) if need_u else None
        db = grad_y.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return dx, du, db, None, None


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                    dilation=1, groups=1, tile: Optional[int] = None,
                    transformed: Optional[Tensor] = None) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups), by Winograd F(tile x tile, r x r) where
    `supported` (else exactly F.conv2d). `tile`: one of TILES[r] (None: `choose_tile`). `transformed`: the
    output of `winograd_weight(weight, tile)`, to share one weight transform between calls."""
    if not supported(x, weight, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    p = uniform(padding)
    if p:
        x = F.pad(x, (p, p, p, p))
    if tile is None:
        tile = choose_tile(x, weight)
    r = weight.shape[-1]
    u = winograd_weight(weight, tile) if transformed is None else transformed
    if u.shape != ((tile + r - 1) ** 2, weight.shape[0], weight.shape[1]):
        raise ValueError(f"transformed weight {tuple(u.shape)} does not match F({tile}, {r}) "
                         f"of {tuple(weight.shape)}")
    return _WinogradConv.apply(x, u, bias, tile, r)
