"""Piggyback convolutions: each task's filters = new unconstrained filters + combinations of a frozen bank.

Implements one layer of Zhai et al., "Piggyback GAN: Efficient Lifelong Learning for Image Conditioned
Generation", ECCV 2020 (arXiv 2104.11939), as docs/method.md states it. Unlike the public code the
piggyback filters are true combinations of bank filters and every task keeps its own bias (docs/method.md,
"Piggyback filters in the span of the bank" and "Every per-task tensor stored").

Paper symbols -> names here: F (filter bank) -> `filter_bank`, unconstrained filters U_t -> `new_filters`,
piggyback weight matrix W_t -> `mix_weights`, lambda -> `lam`, m = ceil(lam * n), p = n - m.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .config import check_lam
from .convkernels import conv2d, conv_transpose2d, kept_transform
from .taskmodule import TaskModule


def num_unconstrained(lam: float, n: int) -> int:
    """m = ceil(lam * n), the number of new filters a task adds; immune to float noise (0.1 * 30 -> 3)."""
    return math.ceil(round(check_lam(lam, "lam") * n, 6))


def compose_weight(bank: Tensor, mix: Optional[Tensor], new: Tensor, transposed: bool) -> Tensor:
    """Dense weight of one task: W = cat([U, P]) along the filter axis (docs/method.md).

    Conv2d (filters on dim 0):          P = einsum('nchw,np->pchw', bank, mix)
    ConvTranspose2d (filters on dim 1): P = einsum('cnhw,np->cphw', bank, mix)
    Both are computed as a single matmul on the bank seen as a matrix of filters.
    """
    if mix is None or mix.shape[1] == 0:      # task 1, or lam = 1: no piggyback filters
        return new
    if not transposed:
        n_bank = bank.shape[0]
        flat = bank.reshape(n_bank, -1)                        # (N, d) view: the bank is sliced on dim 0
        pb = (mix.t() @ flat).view(mix.shape[1], *bank.shape[1:])  # (p, C_in, kh, kw)
        return torch.cat([new, pb], 0)
    c_in, n_bank, kh, kw = bank.shape
    # The reshape copies the (possibly strided) bank slice into a fixed layout, so the matmul sees the
    # same memory layout however large the bank has grown: frozen tasks stay bit-identical.
    flat = bank.permute(0, 2, 3, 1).reshape(c_in * kh * kw, n_bank)  # (C_in*kh*kw, N)
    pb = (flat @ mix).view(c_in, kh, kw, -1).permute(0, 3, 1, 2)     # (C_in, p, kh, kw)
    return torch.cat([new, pb], 1)


def cheaper_order(n: int, p: int, n_bank: int, filter_size: int, per_filter: int, out_pixels: int) -> str:
    """The order choice of a piggyback layer: "compose" or "mix_outputs", whichever takes fewer multiply-adds.

    Both orders compute the same linear map (see docs/method.md, "Order choice"). With n filters of which
    p are piggyback (m = n - p new), a bank of N filters of d values, c multiply-adds per filter
    convolution and o output pixels over the batch (`conv_work` gives c and o):

        compose:      p * N * d  +  n * c          (P = F W_t, then one convolution over n filters)
        mix outputs:  (m + N) * c  +  p * N * o    (convolve with U_t and F, then mix F's outputs)

    Composing is independent of the input size; mixing outputs wins on small feature maps with large
    filters (the inner layers of a U-Net). Ties go to composing. Only shapes enter, so an input of a given
    size always takes the same path (bit-exact probes).
    """
    compose = p * n_bank * filter_size + n * per_filter
    mix_outputs = (n - p + n_bank) * per_filter + p * n_bank * out_pixels
    return "mix_outputs" if mix_outputs < compose else "compose"


class _PiggybackConvNd(TaskModule):
    """State and task bookkeeping shared by the two piggyback layers (see docs/architecture.md, Layers).

    Tasks are numbered from 1. Frozen task s lives in buffers: its new filters are rows
    [N_{s-1}, N_s) of `filter_bank`, plus `mix_<s>` (N_{s-1} x p_s, absent when p_s = 0) and `bias_<s>`.
    The trainable task (at most one, always the last) lives in Parameters `new_filters`, `mix_weights`
    (None for task 1 or p = 0) and `bias`; its filters join the bank only when it is frozen.
    """

    transposed = False
    filter_dim = 0                              # Axis of the weight that indexes output filters.
    task_tensors = {"filters": "new_filters", "mix": "mix_weights", "bias": "bias"}

    def __init__(
        self,
        in_channels: int,                       # C_in.
        out_channels: int,                      # n, the number of output filters.
        kernel_size: int | tuple[int, int],     # kh, kw.
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,                      # Per-task bias (False before batch norm, as junyanz).
        output_padding: int | tuple[int, int] = 0,  # ConvTranspose2d only.
    ):
        super().__init__()
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = pair(kernel_size), pair(stride), pair(padding)
        self.output_padding = pair(output_padding)
        self.has_bias = bias
        self.lams: list[float] = []             # One lambda per task; task 1 is recorded as 1.0.
        self.register_buffer("filter_bank", torch.empty(self._filter_shape(0)))
        self.register_parameter("new_filters", None)
        self.register_parameter("mix_weights", None)
        self.register_parameter("bias", None)
        self._weight_cache: Optional[dict] = None  # see `cache_composed_weights`

    # -- shapes and sizes --------------------------------------------------------------------------
    def _filter_shape(self, count: int) -> tuple[int, ...]:
        kh, kw = self.kernel_size
        if self.transposed:
            return (self.in_channels, count, kh, kw)
        return (count, self.in_channels, kh, kw)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self._filter_shape(self.out_channels)

    @property
    def filter_size(self) -> int:
        """d = C_in * kh * kw, the number of values in one filter."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def num_tasks(self) -> int:
        return len(self.lams)

    def num_new(self, t: int) -> int:
        """m_t: filters task t adds to the bank (n for task 1)."""
        return num_unconstrained(self.lams[t - 1], self.out_channels)

    def bank_rows_before(self, t: int) -> int:
        """N_{t-1}: bank filters task t composes from."""
        return sum(self.num_new(s) for s in range(1, t))

    # -- task operations ---------------------------------------------------------------------------
    def _new_task(self, lam: Optional[float]) -> None:
        """Fresh trainable tensors for a task of lambda `lam` (1.0 for task 1): m new filters, the mixing matrix."""
        if self.num_tasks and lam is None:
            raise ValueError("a task after the first needs its lambda (networks.resolve_layer_lams gives it)")
        lam = 1.0 if self.num_tasks == 0 else float(lam)
        m = num_unconstrained(lam, self.out_channels)
        p = self.out_channels - m
        n_bank = self.bank_rows_before(self.num_tasks + 1)
        like = dict(device=self.filter_bank.device, dtype=self.filter_bank.dtype)
        self.lams.append(lam)
        self.new_filters = nn.Parameter(torch.empty(self._filter_shape(m), **like))
        self.mix_weights = nn.Parameter(torch.empty(n_bank, p, **like)) if p > 0 else None
        self.bias = nn.Parameter(torch.empty(self.out_channels, **like)) if self.has_bias else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """junyanz / public Piggyback init: filters and mixing weights ~ N(0, 0.02), bias 0."""
        if self.new_filters is not None:
            nn.init.normal_(self.new_filters, 0.0, 0.02)
        if self.mix_weights is not None:
            nn.init.normal_(self.mix_weights, 0.0, 0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # -- per-task storage: task s's new filters are rows [N_{s-1}, N_s) of the bank -------------------
    def _store(self, key: str, t: int, value: Tensor) -> None:
        if key != "filters":
            return super()._store(key, t, value)
        self.filter_bank = torch.cat([self.filter_bank, value], self.filter_dim)

    def _stored(self, key: str, t: int) -> Optional[Tensor]:
        if key != "filters":
            return super()._stored(key, t)
        return self.filter_bank.narrow(self.filter_dim, self.bank_rows_before(t), self.num_new(t))

    def _unstore(self, key: str, t: int) -> Optional[Tensor]:
        if key != "filters":
            return super()._unstore(key, t)
        start = self.bank_rows_before(t)
        filters = self.filter_bank.narrow(self.filter_dim, start, self.num_new(t)).clone()
        self.filter_bank = self.filter_bank.narrow(self.filter_dim, 0, start).clone()
        return filters

    # -- the composed weight -------------------------------------------------------------------------
    def task_weight(self, t: int) -> Tensor:
        """Dense weight of task t, composed from its own tensors and the first N_{t-1} bank filters."""
        state = self.task_state(t)
        bank = self.filter_bank.narrow(self.filter_dim, 0, self.bank_rows_before(t))
        weight = compose_weight(bank, state.get("mix"), state["filters"], self.transposed)
        if weight.shape != self.weight_shape:   # the one shape check where the bank is composed
            raise RuntimeError(f"composed weight {tuple(weight.shape)} != expected {self.weight_shape}")
        return weight

    def cache_composed_weights(self, enabled: bool) -> None:
        """Start (True) or end (False) a scope in which `forward` composes each task's weight only once.

        Used by `lifelong.reuse_composed_weights` for one training iteration; ending it drops the cache,
        which holds weights of the parameter values at the time they were composed.
        """
        self._weight_cache = {} if enabled else None

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Run the active task. Two exact orders of the same linear map, chosen by arithmetic cost:

        compose: W = cat([U, P]) once, then one convolution (cost independent of the input size);
        mix outputs: convolve with U and with the bank F, then mix the bank's output channels with W_t
        (cheaper where the feature map is small, e.g. the inner layers of a U-Net: composing a
        512x512x4x4 weight from a bank of 640 filters costs ~2 GMAC, convolving a 2x2 map a few MMAC).
        The choice depends only on shapes, so a given input always takes the same path (bit-exact probes).
        """
        t = self._active()
        state = self.task_state(t)
        mix = state.get("mix")
        if mix is None or mix.shape[1] == 0 or self.order_for(x, mix.shape[0], mix.shape[1]) == "compose":
            return self._conv(x, self._composed(t), state.get("bias"), task=t)
        bank = self.filter_bank.narrow(self.filter_dim, 0, mix.shape[0])
        filters = state["filters"]
        if self.transposed:   # slices on dim 1 are strided: a fixed layout however large the bank grows
            bank, filters = bank.contiguous(), filters.contiguous()
        bias = state.get("bias")
        m = filters.shape[self.filter_dim]
        own = self._conv(x, filters, None if bias is None else bias[:m])
        mixed = torch.einsum("bnhw,np->bphw", self._conv(x, bank, None), mix)
        if bias is not None:
            mixed = mixed + bias[m:].view(1, -1, 1, 1)
        return torch.cat([own, mixed], 1)

    def _composed(self, t: int) -> Tensor:
        """task_weight(t), computed once per `cache_composed_weights` scope (same grad/autocast mode)."""
        cache = self._weight_cache
        if cache is None:
            return self.task_weight(t)
        key = (t, torch.is_grad_enabled(), torch.is_autocast_enabled())
        if key not in cache:
            cache[key] = self.task_weight(t)
        return cache[key]

    #: "auto" (cheaper order per call), "compose" or "mix_outputs": a class-wide override for tests/benchmarks.
    order = "auto"

    #: The training-time convolution kernel (`train.conv_kernels`, piggyback/convkernels.py); set per
    #: network with `set_conv_kernels`.
    conv_kernels = "direct"

    def conv_work(self, x: Tensor) -> tuple[int, int]:
        """(multiply-adds per output filter, output pixels over the batch) of convolving input `x` (B, C, H, W).

        Per filter: d * B * H_out * W_out for a convolution, d * B * H * W for a transposed one (each input
        pixel scatters one kh x kw patch per output filter).
        """
        b, _, h, w = x.shape
        ho, wo = self._out_hw(h, w)
        return self.filter_size * b * (h * w if self.transposed else ho * wo), b * ho * wo

    def order_for(self, x: Tensor, n_bank: int, p: int) -> str:
        """The order `forward` takes for input `x` with a bank of `n_bank` filters and `p` piggyback filters:
        `cheaper_order` of this layer's shapes, unless the class-wide `order` override says otherwise."""
        if self.order != "auto":
            return self.order
        if x.dim() != 4:
            return "compose"
        per_filter, out_pixels = self.conv_work(x)
        return cheaper_order(self.out_channels, p, n_bank, self.filter_size, per_filter, out_pixels)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.transposed:
            s += f", output_padding={self.output_padding}"
        return s + f", bias={self.has_bias}, lams={self.lams}, active={self.active_task}"


class PiggybackConv2d(_PiggybackConvNd):
    """Conv2d whose task t >= 2 weight is cat([U_t, einsum('nchw,np->pchw', F, W_t)], 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias)

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], task: Optional[int] = None) -> Tensor:
        """F.conv2d, or while training with `conv_kernels: auto` a faster kernel for the same sums
        (piggyback/convkernels.py). `task`: `weight` is that task's composed weight, whose Winograd
        transform is then kept for the `cache_composed_weights` scope like the weight itself."""
        return conv2d(self.conv_kernels, x, weight, bias, self.stride, self.padding,
                      transform=lambda tile: self._transformed(task, weight, tile))

    def _transformed(self, task: Optional[int], weight: Tensor, tile: int) -> Optional[Tensor]:
        """fastconv.winograd_weight of task `task`'s composed weight, once per cache scope (None: no scope)."""
        return None if task is None else kept_transform(self._weight_cache, (task,), weight, tile)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def to_dense(self, t: int) -> nn.Conv2d:
        """A plain nn.Conv2d holding task t's weights (for materialised inference)."""
        conv = torch.nn.utils.skip_init(nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size,
                                        self.stride, self.padding, bias=self.has_bias,
                                        device=self.filter_bank.device, dtype=self.filter_bank.dtype)
        _copy_dense(conv, self, t)
        return conv


class PiggybackConvTranspose2d(_PiggybackConvNd):
    """ConvTranspose2d (weight (C_in, n, kh, kw)): task t >= 2 weight is cat([U_t, einsum('cnhw,np->cphw', F, W_t)], 1)."""

    transposed = True
    filter_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 output_padding: int | tuple[int, int] = 0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, output_padding)

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], task: Optional[int] = None) -> Tensor:
        """F.conv_transpose2d, or while training with `conv_kernels: auto` the same sums as a matrix product
        where that is faster (piggyback/convkernels.py)."""
        return conv_transpose2d(self.conv_kernels, x, weight, bias, self.stride, self.padding, self.output_padding)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (oh, ow) = self.kernel_size, self.stride, self.padding, self.output_padding
        return (h - 1) * sh - 2 * ph + kh + oh, (w - 1) * sw - 2 * pw + kw + ow

    def to_dense(self, t: int) -> nn.ConvTranspose2d:
        """A plain nn.ConvTranspose2d holding task t's weights (for materialised inference)."""
        conv = torch.nn.utils.skip_init(nn.ConvTranspose2d, self.in_channels, self.out_channels,
                                        self.kernel_size, self.stride, self.padding, self.output_padding,
                                        bias=self.has_bias, device=self.filter_bank.device,
                                        dtype=self.filter_bank.dtype)
        _copy_dense(conv, self, t)
        return conv


@torch.no_grad()
def _copy_dense(conv: nn.Module, layer: _PiggybackConvNd, t: int) -> None:
    conv.weight.copy_(layer.task_weight(t))
    if layer.has_bias:
        conv.bias.copy_(layer.task_state(t)["bias"])


PIGGYBACK_LAYERS = (PiggybackConv2d, PiggybackConvTranspose2d)
