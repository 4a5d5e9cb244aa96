"""`train.conv_kernels`: the matrix-product convolution equals the direct kernel within float tolerance,
forward and every gradient; `auto` takes it only where the rule says (shapes, CPU, float32, training)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from piggyback import convkernels as ck
from piggyback.convkernels import set_conv_kernels
from piggyback.layers import PiggybackConv2d, PiggybackConvTranspose2d

# The same sums in another order: float32 rounding, a few ulps of the largest term per output.
RTOL, ATOL = 1e-5, 1e-5

CONV_CASES = [  # (N, C, O, H, W, k, stride, padding)
    (1, 8, 6, 4, 4, 4, 2, 1), (2, 5, 7, 5, 3, 3, 1, 1), (3, 4, 4, 2, 2, 4, 2, 1),
    (1, 3, 9, 7, 6, 3, 2, 0), (2, 6, 3, 2, 2, 4, 2, 1),
    (1, 4, 5, 9, 9, 3, 1, 1), (2, 3, 4, 8, 7, 3, 1, 1),     # more than THIN_COLUMNS output pixels
]
TRANSPOSED_CASES = [  # (N, C, O, H, W, k, stride, padding, output_padding)
    (1, 8, 6, 2, 2, 4, 2, 1, 0), (2, 5, 7, 3, 1, 3, 2, 1, 1), (1, 4, 3, 1, 1, 4, 2, 1, 0),
    (3, 6, 5, 4, 3, 3, 1, 1, 0),
    (1, 4, 3, 7, 6, 3, 1, 1, 0), (2, 5, 4, 6, 6, 4, 2, 1, 0),   # more than THIN_COLUMNS input pixels
]


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*tensors)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gemm_equals_conv2d(case, dtype):
    n, c, o, h, w, k, s, p = case
    g = torch.Generator().manual_seed(sum(case))
    x, wt, b = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((n, c, h, w), (o, c, k, k), (o,)))
    y0, g0 = _grads(lambda x, wt, b: F.conv2d(x, wt, b, s, p), x, wt, b)
    y1, g1 = _grads(lambda x, wt, b: ck.conv2d_gemm(x, wt, b, (s, s), (p, p)), x, wt, b)
    tol = dict(rtol=RTOL, atol=ATOL) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y1, y0, **tol)
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", TRANSPOSED_CASES)
def test_conv_transpose2d_gemm_equals_conv_transpose2d(case, dtype):
    n, c, o, h, w, k, s, p, op = case
    g = torch.Generator().manual_seed(sum(case))
    x, wt, b = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((n, c, h, w), (c, o, k, k), (o,)))
    y0, g0 = _grads(lambda x, wt, b: F.conv_transpose2d(x, wt, b, s, p, op), x, wt, b)
    y1, g1 = _grads(lambda x, wt, b: ck.conv_transpose2d_gemm(x, wt, b, (s, s), (p, p), (op, op)), x, wt, b)
    tol = dict(rtol=RTOL, atol=ATOL) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y1, y0, **tol)
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e, **tol)


def test_auto_rule_follows_shape_weight_device_dtype_and_grad_mode(monkeypatch):
    same = lambda h, w: (h, w)  # noqa: E731
    half = lambda h, w: (h // 2, w // 2)  # noqa: E731
    big, e = torch.empty(1024, 1024, 1, 1), torch.empty
    assert ck.choose_kernel("auto", e(1, 1024, 16, 16), big, 2, 0, half) == "gemm"            # 64 columns
    assert ck.choose_kernel("auto", e(1, 1024, 18, 18), big, 2, 0, half) == "direct"          # 81
    assert ck.choose_kernel("auto", e(4, 1024, 8, 8), big, 1, 0, same, transposed=True) == "gemm"    # 256
    assert ck.choose_kernel("auto", e(5, 1024, 8, 8), big, 1, 0, same, transposed=True) == "direct"  # 320
    assert ck.choose_kernel("auto", e(1, 1023, 2, 2), e(1023, 1023, 1, 1), 1, 0, same) == "direct"  # weight < 1M
    assert ck.choose_kernel("direct", e(1, 1024, 2, 2), big, 1, 0, same) == "direct"
    assert ck.choose_kernel("auto", e(1, 1024, 2, 2).double(), big.double(), 1, 0, same) == "direct"
    assert ck.choose_kernel("auto", e(1, 1024, 2, 2, device="meta"), big, 1, 0, same) == "direct"
    with torch.no_grad():                                       # evaluation, probes, audit: direct kernel
        assert ck.choose_kernel("auto", e(1, 1024, 2, 2), big, 1, 0, same) == "direct"


def _three_task_layer(transposed: bool):
    """A 4x4 stride-2 piggyback layer training task 3 (tasks 1-2 frozen), as in a U-Net."""
    torch.manual_seed(0)
    layer = PiggybackConvTranspose2d(6, 8, 4, 2, 1) if transposed else PiggybackConv2d(6, 8, 4, 2, 1)
    for lam in (None, 0.25, 0.25):
        layer.add_task(lam)
    return layer


@pytest.mark.parametrize("transposed", [False, True])
def test_piggyback_layer_training_step_equal_and_inference_bit_identical(transposed, monkeypatch):
    """A task-3 piggyback layer with `auto`: the training forward/backward within tolerance of `direct`,
    every order (compose, mix outputs); under no_grad bit-identical (the direct kernel runs)."""
    name = "conv_transpose2d_gemm" if transposed else "conv2d_gemm"
    monkeypatch.setattr(ck, "GEMM_MIN_WEIGHT", 0)            # the test layer's weight is small
    calls = []
    real = getattr(ck, name)
    monkeypatch.setattr(ck, name, lambda *a: calls.append(1) or real(*a))
    for order in ("compose", "mix_outputs"):
        layer = _three_task_layer(transposed)
        x = torch.randn(2, layer.in_channels, 2, 2, generator=torch.Generator().manual_seed(1))
        outs, grads = [], []
        for kernels in ("direct", "auto"):
            set_conv_kernels(layer, kernels)
            layer.zero_grad()
            old, type(layer).order = type(layer).order, order
            try:
                y = layer(x)
                y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
                with torch.no_grad():
                    outs.append((y.detach(), layer(x)))
            finally:
                type(layer).order = old
            grads.append([p.grad.clone() for p in layer.parameters() if p.grad is not None])
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=RTOL, atol=ATOL)
        assert torch.equal(outs[1][1], outs[0][1])
        assert len(grads[0]) == len(grads[1]) > 0
        assert calls, "auto did not take the matrix-product path"
        calls.clear()
        for a, e in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL)


def test_choose_kernel_on_the_shapes_that_matter():
    """ResNet blocks at ngf 64: Winograd; U-Net inner layers: matrix products; the embedded suite's narrow
    networks (ngf 16, batch 1 included) and every large map: the direct kernel."""
    conv_out = lambda k, s, p: (lambda h, w: ((h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1))  # noqa: E731
    up_out = lambda h, w: (2 * h, 2 * w)  # noqa: E731
    e = torch.empty
    assert ck.choose_kernel("auto", e(1, 256, 34, 34), e(256, 256, 3, 3), 1, 0, conv_out(3, 1, 0)) == "winograd"
    assert ck.choose_kernel("direct", e(1, 256, 34, 34), e(256, 256, 3, 3), 1, 0, conv_out(3, 1, 0)) == "direct"
    assert ck.choose_kernel("auto", e(1, 512, 8, 8), e(512, 512, 4, 4), 2, 1, conv_out(4, 2, 1)) == "gemm"
    assert ck.choose_kernel("auto", e(1, 1024, 4, 4), e(1024, 512, 4, 4), 2, 1, up_out, transposed=True) == "gemm"
    assert ck.choose_kernel("auto", e(1, 128, 128, 128), e(128, 64, 4, 4), 2, 1, up_out, transposed=True) == "direct"
    for n in (1, 4):    # embedded suite: resnet_6blocks, ngf 16, 64x64 crops
        assert ck.choose_kernel("auto", e(n, 64, 18, 18), e(64, 64, 3, 3), 1, 0, conv_out(3, 1, 0)) == "direct"
        assert ck.choose_kernel("auto", e(n, 64, 16, 16), e(64, 32, 3, 3), 2, 1, up_out, transposed=True) == "direct"
        assert ck.choose_kernel("auto", e(n, 32, 32, 32), e(64, 32, 3, 3), 2, 1, conv_out(3, 2, 1)) == "direct"
        # PatchGAN, ndf 16 on 64x64 crops: its 4x4 stride-1 layer 64 -> 128 at 8x8
        assert ck.choose_kernel("auto", e(n, 64, 8, 8), e(128, 64, 4, 4), 1, 1, conv_out(4, 1, 1)) == "direct"
    # PatchGAN, ndf 64: the 256 -> 512 4x4 stride-1 layer at 256x256 input (32x32 maps) takes Winograd,
    # at 128x128 input (16x16) not; its stride-2 layers never (measured slower by space-to-depth)
    assert ck.choose_kernel("auto", e(1, 256, 32, 32), e(512, 256, 4, 4), 1, 1, conv_out(4, 1, 1)) == "winograd"
    assert ck.choose_kernel("auto", e(1, 256, 16, 16), e(512, 256, 4, 4), 1, 1, conv_out(4, 1, 1)) == "direct"
    assert ck.choose_kernel("auto", e(1, 128, 64, 64), e(256, 128, 4, 4), 2, 1, conv_out(4, 2, 1)) == "direct"
    with torch.no_grad():
        assert ck.choose_kernel("auto", e(1, 512, 8, 8), e(512, 512, 4, 4), 2, 1, conv_out(4, 2, 1)) == "direct"
        assert ck.choose_kernel("auto", e(1, 256, 32, 32), e(512, 256, 4, 4), 1, 1, conv_out(4, 1, 1)) == "direct"


def test_discriminator_conv_is_nn_conv2d_with_the_switch(monkeypatch):
    """convkernels.Conv2d: nn.Conv2d's parameters and state dict; direct by default (bit-identical to
    nn.Conv2d); with `auto` Winograd for its 4x4 stride-1 layers, one weight transform per
    `reuse_composed_weights` scope, gradients equal to F.conv2d's."""
    from piggyback import fastconv
    from piggyback.lifelong import reuse_composed_weights

    torch.manual_seed(0)
    conv, plain = ck.Conv2d(6, 5, 4, 1, 1), torch.nn.Conv2d(6, 5, 4, 1, 1)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(conv.state_dict())
    x1, x2 = torch.randn(2, 6, 9, 9), torch.randn(1, 6, 7, 11)
    assert torch.equal(conv(x1), plain(x1))
    transforms = []
    weight = fastconv.winograd_weight
    monkeypatch.setattr(fastconv, "winograd_weight", lambda *a: transforms.append(1) or weight(*a))
    monkeypatch.setattr(fastconv, "worthwhile", lambda *a: True)            # a small test layer
    set_conv_kernels(conv, "auto")
    with reuse_composed_weights(conv):
        loss = conv(x1).square().sum() + conv(x2).sum()
    ref = plain(x1).square().sum() + plain(x2).sum()
    assert len(transforms) == 1
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(loss, [conv.weight, conv.bias]), torch.autograd.grad(ref, [plain.weight, plain.bias])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    conv(x1)                                                     # outside the scope: its own transform
    assert len(transforms) == 2
    with pytest.raises(ValueError, match="zero padding"):
        ck.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="groups"):
        ck.Conv2d(4, 4, 3, groups=2)


def test_set_conv_kernels_refuses_unknown_names():
    with pytest.raises(ValueError, match="train.conv_kernels"):
        set_conv_kernels(PiggybackConv2d(2, 2, 3), "fast")
