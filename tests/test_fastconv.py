"""Winograd 3x3 and 4x4 convolution (piggyback/fastconv.py, `train.conv_kernels: auto`) against F.conv2d.

Tolerances: Winograd computes the same sums in another order and through transformed values (input
tiles multiplied by B's entries of up to 5, filters by G's fractions, outputs through A's entries of up
to 8), so float32 results differ from F.conv2d by rounding that grows with those magnitudes: measured
about 5e-7 of max |y| for F(2x2, 3x3), 6e-6 for F(4x4, 3x3) and 4e-6 for F(3x3, 4x4) and F(4x4, 4x4).
The float32 checks allow 10x that (relative to the largest value of the reference); the float64 check
at 1e-10 shows the transforms are exact (F.conv2d's own float64 rounding is ~1e-16).
"""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from piggyback import PiggybackConv2d, fastconv
from piggyback.convkernels import set_conv_kernels

pytestmark = pytest.mark.usefixtures("single_thread")

TOL32 = {2: 1e-5, 3: 1e-4, 4: 1e-4}
ALGORITHMS = [(2, 3), (4, 3), (3, 4), (4, 4)]      # F(tile, r)
SHAPES = [  # (N, C, K, H, W): odd sizes, batch > 1, channel counts that are not multiples of 8
    (1, 5, 7, 9, 9),
    (2, 3, 6, 11, 8),
    (3, 13, 9, 6, 13),
    (1, 16, 24, 34, 34),
    (2, 1, 1, 3, 3),
    (1, 4, 3, 5, 20),
]


def _close(a, b, tol):
    assert a.shape == b.shape and a.dtype == b.dtype
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"max error {err:.3g} over max {scale:.3g}"


def _both(shape, tile, dtype, bias=True, seed=0, r=3, padding=0):
    """(Winograd, F.conv2d) forward outputs and the gradients of x, weight and bias."""
    n, c, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(k, c, r, r, generator=g, dtype=dtype)
    b = torch.randn(k, generator=g, dtype=dtype) if bias else None
    grad = torch.randn(n, k, h + 2 * padding - r + 1, w + 2 * padding - r + 1, generator=g, dtype=dtype)
    out = []
    for conv in (lambda *a: fastconv.winograd_conv2d(*a, padding=padding, tile=tile),
                 lambda *a: F.conv2d(*a, padding=padding)):
        leaves = [t.clone().requires_grad_() for t in (x, weight, b) if t is not None]
        y = conv(*leaves) if bias else conv(*leaves, None)
        y.backward(grad)
        out.append((y.detach(), *(t.grad for t in leaves)))
    return out


def test_matrices_are_lavin_and_grays_and_compute_the_correlation():
    """F(4, 3) is the paper's; every F(m, r) computes y_i = sum_k d_(i+k) g_k exactly (rationals)."""
    assert fastconv.matrices(4, 3)["BT"][0] == [4, 0, -5, 0, 1, 0]
    assert fastconv.matrices(4, 3)["G"][3] == [Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)]
    assert fastconv.matrices(4, 3)["AT"][3] == [0, 1, -1, 8, -8, 1]
    for m, r in ALGORITHMS:
        mats, n = fastconv.matrices(m, r), m + r - 1
        g = [Fraction(3 * k + 1, 7) for k in range(r)]
        d = [Fraction((5 * i) % 11 - 4, 3) for i in range(n)]
        gg = [sum(row[k] * g[k] for k in range(r)) for row in mats["G"]]
        bd = [sum(row[i] * d[i] for i in range(n)) for row in mats["BT"]]
        y = [sum(row[j] * gg[j] * bd[j] for j in range(n)) for row in mats["AT"]]
        assert y == [sum(d[i + k] * g[k] for k in range(r)) for i in range(m)], (m, r)


@pytest.mark.parametrize("shape, tile, r", [(s, m, r) for s in SHAPES for m, r in ALGORITHMS if min(s[3:]) >= r])
def test_float32_forward_and_gradients_match_conv2d(shape, tile, r):
    ours, ref = _both(shape, tile, torch.float32, r=r)
    for a, b in zip(ours, ref):
        _close(a, b, TOL32[tile])


@pytest.mark.parametrize("tile, r", ALGORITHMS)
@pytest.mark.parametrize("shape", [(2, 3, 6, 11, 8), (1, 8, 5, 2, 3), (1, 16, 24, 32, 32)])
def test_zero_padding_matches_conv2d(shape, tile, r):
    """PatchGAN's layers pad 1 (a 4x4 kernel: the output is one smaller than the input)."""
    ours, ref = _both(shape, tile, torch.float32, r=r, padding=1, seed=3)
    for a, b in zip(ours, ref):
        _close(a, b, TOL32[tile])


@pytest.mark.parametrize("tile, r", ALGORITHMS)
@pytest.mark.parametrize("shape", [(2, 3, 6, 11, 8), (1, 16, 24, 34, 34), (3, 13, 9, 6, 13)])
def test_float64_is_exact_to_rounding(shape, tile, r):
    ours, ref = _both(shape, tile, torch.float64, seed=1, r=r, padding=r - 3)
    for a, b in zip(ours, ref):
        _close(a, b, 1e-10)


def test_without_bias_and_partial_gradients():
    ours, ref = _both((2, 6, 5, 10, 7), 4, torch.float32, bias=False)
    for a, b in zip(ours, ref):
        _close(a, b, TOL32[4])
    x, w = torch.randn(1, 6, 10, 10), torch.randn(5, 6, 3, 3, requires_grad=True)
    (gw,) = torch.autograd.grad(fastconv.winograd_conv2d(x, w).sum(), w)
    (rw,) = torch.autograd.grad(F.conv2d(x, w).sum(), w)
    _close(gw, rw, TOL32[4])
    with torch.no_grad():
        _close(fastconv.winograd_conv2d(x, w), F.conv2d(x, w), TOL32[4])


def test_layouts_of_the_input_do_not_matter():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 8, 14, 14, generator=g), torch.randn(8, 8, 3, 3, generator=g)
    ref = F.conv2d(x, w)
    for variant in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
                    torch.randn(2, 8, 14, 28, generator=g)[..., ::2].copy_(x)):
        _close(fastconv.winograd_conv2d(variant, w), ref, TOL32[4])


def test_a_shared_transformed_weight_sums_the_gradients_of_its_calls():
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(1, 6, 12, 12, generator=g), torch.randn(2, 6, 9, 9, generator=g)
    w = torch.randn(4, 6, 3, 3, generator=g, requires_grad=True)
    u = fastconv.winograd_weight(w, 4)
    loss = fastconv.winograd_conv2d(x1, w, transformed=u).square().sum() + fastconv.winograd_conv2d(x2, w, transformed=u).sum()
    (ours,) = torch.autograd.grad(loss, w)
    (ref,) = torch.autograd.grad(F.conv2d(x1, w).square().sum() + F.conv2d(x2, w).sum(), w)
    _close(ours, ref, TOL32[4])
    with pytest.raises(ValueError, match="transformed"):
        fastconv.winograd_conv2d(x1, w, tile=2, transformed=u)
    with pytest.raises(ValueError, match="tile"):
        fastconv.winograd_weight(w, 3)
    with pytest.raises(ValueError, match="tile"):
        fastconv.winograd_weight(torch.randn(4, 6, 5, 5), 4)


@pytest.mark.parametrize("case", [
    dict(stride=2), dict(padding=(1, 0)), dict(padding="same"), dict(dilation=2), dict(groups=2), dict(kernel=1),
    dict(kernel=5), dict(kernel=2),
    dict(dtype=torch.bfloat16), dict(dtype=torch.float16),
])
def test_what_it_does_not_handle_is_exactly_conv2d(case):
    kernel, dtype = case.pop("kernel", 3), case.pop("dtype", torch.float32)
    groups = case.get("groups", 1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 11, 11, generator=g).to(dtype)
    w = torch.randn(4, 6 // groups, kernel, kernel, generator=g).to(dtype)
    b = torch.randn(4, generator=g).to(dtype)
    assert not fastconv.supported(x, w, **case)
    assert torch.equal(fastconv.winograd_conv2d(x, w, b, **case), F.conv2d(x, w, b, **case))


def test_autocast_falls_back_to_conv2d():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fastconv.supported(x, w)
        assert torch.equal(fastconv.winograd_conv2d(x, w), F.conv2d(x, w))


def test_worthwhile_only_where_measured_faster():
    w = lambda c, k: torch.empty(k, c, 3, 3)  # noqa: E731
    assert fastconv.worthwhile(torch.empty(1, 256, 34, 34), w(256, 256))      # resnet blocks at 128x128 input
    assert fastconv.worthwhile(torch.empty(1, 256, 66, 66), w(256, 256))      # ... at 256x256
    assert not fastconv.worthwhile(torch.empty(1, 256, 18, 18), w(256, 256))  # 16x16 output: too few tiles
    assert not fastconv.worthwhile(torch.empty(1, 128, 34, 34), w(128, 128))
    assert fastconv.worthwhile(torch.empty(1, 128, 66, 66), w(128, 128))
    assert not fastconv.worthwhile(torch.empty(1, 64, 130, 130), w(64, 64))   # 64 channels: never
    w4 = lambda c, k: torch.empty(k, c, 4, 4)  # noqa: E731
    assert fastconv.worthwhile(torch.empty(1, 256, 32, 32), w4(256, 512), 1)   # PatchGAN at 256x256 input
    assert not fastconv.worthwhile(torch.empty(1, 256, 16, 16), w4(256, 512), 1)  # ... at 128x128
    assert not fastconv.worthwhile(torch.empty(1, 512, 32, 32), w4(512, 1), 1)    # its 1-channel output


# -- the layer switch (train.conv_kernels) -------------------------------------------------------------------
@pytest.fixture
def counted(monkeypatch):
    """Every shape counts as worthwhile (the test layers are small); counts Winograd convolutions and
    weight transforms."""
    counts = {"conv": 0, "weight": 0}
    conv, weight = fastconv.winograd_conv2d, fastconv.winograd_weight

    def count(key, fn):
        def wrapped(*a, **kw):
            counts[key] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(fastconv, "worthwhile", lambda *a: True)
    monkeypatch.setattr(fastconv, "winograd_conv2d", count("conv", conv))
    monkeypatch.setattr(fastconv, "winograd_weight", count("weight", weight))
    return counts


def _task3_layer(**kw):
    torch.manual_seed(0)
    layer = PiggybackConv2d(12, 10, 3, **kw)
    for lam in (None, 0.5, 0.25):
        layer.add_task(lam)
    layer.reset_parameters()
    return layer


def test_the_switch_uses_winograd_for_eligible_convolutions_only(counted):
    layer, x = _task3_layer(), torch.randn(2, 12, 10, 10)
    direct = layer(x)
    assert layer.conv_kernels == "direct" and counted["conv"] == 0
    set_conv_kernels(layer, "auto")
    _close(layer(x), direct, TOL32[4])
    assert counted["conv"] == 1
    with torch.no_grad():                      # evaluation, probes: the direct kernel, bit for bit
        assert torch.equal(layer(x), direct.detach()) and counted["conv"] == 1
    strided = _task3_layer(stride=2)                 # not Winograd (4x4 output: the matrix-product kernel)
    set_conv_kernels(strided, "auto")
    _close(strided(x), F.conv2d(x, strided.task_weight(3), strided.bias, 2), 1e-5)
    assert counted["conv"] == 1
    set_conv_kernels(layer, "direct")
    assert torch.equal(layer(x), direct) and counted["conv"] == 1
    with pytest.raises(ValueError, match="conv_kernels"):
        set_conv_kernels(layer, "fft")


def test_one_weight_transform_per_cache_scope(counted):
    layer, x1, x2 = _task3_layer(), torch.randn(1, 12, 10, 10), torch.randn(2, 12, 7, 9)
    ref = F.conv2d(x1, layer.task_weight(3), layer.bias).square().sum() + F.conv2d(x2, layer.task_weight(3), layer.bias).sum()
    ref_grads = torch.autograd.grad(ref, [layer.new_filters, layer.mix_weights, layer.bias])
    set_conv_kernels(layer, "auto")
    layer.cache_composed_weights(True)
    loss = layer(x1).square().sum() + layer(x2).sum()
    layer.cache_composed_weights(False)
    assert (counted["conv"], counted["weight"]) == (2, 1)
    _close(loss.detach(), ref.detach(), TOL32[4])
    for a, b in zip(torch.autograd.grad(loss, [layer.new_filters, layer.mix_weights, layer.bias]), ref_grads):
        _close(a, b, TOL32[4])


def test_tensors_off_the_cpu_fall_back_to_conv2d():
    x, w = torch.empty(2, 8, 10, 10, device="meta"), torch.empty(8, 8, 3, 3, device="meta")
    assert not fastconv.supported(x, w)
    assert fastconv.winograd_conv2d(x, w).shape == (2, 8, 8, 8)
    if torch.cuda.is_available():
        x, w = torch.randn(2, 8, 10, 10, device="cuda"), torch.randn(8, 8, 3, 3, device="cuda")
        assert torch.equal(fastconv.winograd_conv2d(x, w), F.conv2d(x, w))
