"""The restructured recipes (`cyclegan.train_step`, `pix2pix.train_step`) train exactly as junyanz's iteration.

The straightforward iteration is benchmarks/reference.py (six generator calls, separate discriminator calls,
default Adam). Each test runs it and our step on deep copies of the same tiny networks (piggyback
generators training task 3, so composed weights are reused across calls) with the same inputs and image
pools, and compares every loss, every gradient and every updated parameter. Where the arithmetic is the
same the results are bit-identical; where batching changes only the order in which per-image weight
gradients are summed, they agree to float tolerance.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks import reference
from piggyback import convkernels, fastconv, lifelong
from piggyback.config import CycleGANConfig, Pix2PixConfig
from piggyback.discriminators import build_discriminator
from piggyback.convkernels import set_conv_kernels
from piggyback.losses import GANLoss
from piggyback.models import ADAM_IMPLS, Precision, StepTools, adam_options, batchable, cyclegan, pix2pix
from piggyback.networks import GeneratorConfig, build_generator
from piggyback.norms import SeparateCalls

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


def _generator(netG: str, norm: str, dropout: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = build_generator(GeneratorConfig(netG=netG, ngf=4, norm=norm, use_dropout=dropout))
    for _ in range(3):
        lifelong.add_task(net)
    return net.train()


def _optimizers(nets: dict[str, nn.Module], gens: tuple, discs: tuple) -> dict:
    trainable = lambda keys: [p for k in keys for p in nets[k].parameters() if p.requires_grad]  # noqa: E731
    return {"G": reference.adam(trainable(gens)), "D": reference.adam(trainable(discs))}


def _calls(nets: dict[str, nn.Module]) -> dict[str, int]:
    """Count forward calls per network (hooks stay on the modules: the copies are fresh per test)."""
    counts = {k: 0 for k in nets}
    for k, net in nets.items():
        net.register_forward_hook(lambda *_, key=k: counts.__setitem__(key, counts[key] + 1))
    return counts


def _flat(net: nn.Module, grads: bool) -> torch.Tensor:
    return torch.cat([(p.grad if grads else p).detach().flatten() for p in net.parameters() if p.grad is not None])


def _compare_nets(ours: dict[str, nn.Module], ref: dict[str, nn.Module], exact: bool, rtol: float = 1e-5) -> None:
    """Each network's gradient vector (and, when exact, its updated parameters): bit-identical, or within
    `rtol` relative (norm of the difference over the norm).

    Whole vectors, not elements: a bias before instance norm has a true gradient of 0, so its computed
    gradient is rounding noise in any order, and Adam turns that noise into a +-lr step whose sign is a
    coin flip. Parameters are therefore compared only where the arithmetic is the same.
    """
    for k in ours:
        a, b = _flat(ours[k], True), _flat(ref[k], True)
        if exact:
            assert torch.equal(a, b) and torch.equal(_flat(ours[k], False), _flat(ref[k], False)), k
        else:
            assert (a - b).norm() <= rtol * b.norm(), (k, float((a - b).norm() / b.norm()))


def _compare_norms(ours: dict[str, nn.Module], ref: dict[str, nn.Module], rtol: float = 1e-5) -> None:
    """Every batch norm's running statistics within `rtol` relative, its count of batches equal: a batched
    call must update them as the separate calls did, part by part and in the reference's order."""
    for k in ours:
        pairs = [(a, b) for a, b in zip(ours[k].modules(), ref[k].modules()) if isinstance(a, SeparateCalls)]
        for a, b in pairs:
            for (name, x), y in zip(a.named_buffers(), b.buffers()):
                if name.startswith("num_batches_tracked"):
                    assert torch.equal(x, y), (k, name)
                else:
                    assert (x - y).norm() <= rtol * y.norm(), (k, name, float((x - y).norm() / y.norm()))


def _compare_losses(ours: dict, ref: dict, exact: bool, rtol: float = 1e-5) -> None:
    assert ours.keys() == ref.keys()
    for k in ours:
        if exact:
            assert torch.equal(ours[k], ref[k]), k
        else:
            torch.testing.assert_close(ours[k], ref[k], rtol=rtol, atol=rtol * 1e-2, msg=k)


def _cyclegan_nets(norm: str) -> dict[str, nn.Module]:
    torch.manual_seed(7)
    ds = {k: build_discriminator("basic", 3, 4, 3, norm) for k in ("D_A", "D_B")}
    return {"G_A": _generator("resnet_6blocks", norm, False, 0), "G_B": _generator("resnet_6blocks", norm, False, 1), **ds}


def _sync(ours_nets: dict, ours_opt: dict, ref_nets: dict, ref_opt: dict) -> None:
    """Start the reference from our state, so each step is compared from equal weights and Adam moments
    (Adam's first steps turn last-bit differences of near-zero gradients into +-lr steps)."""
    for k, net in ours_nets.items():
        ref_nets[k].load_state_dict(net.state_dict())
    for k, opt in ours_opt.items():
        ref_opt[k].load_state_dict(copy.deepcopy(opt.state_dict()))   # else both share the moments


def _run_cyclegan(norm: str, batch_calls: bool, steps: int = 3, kernels: str = "direct", rtol: float = 1e-5):
    """Run both iterations `steps` times from equal states (pool of 2: the third step swaps stored fakes).
    `kernels`: train.conv_kernels for our networks (the reference always runs F.conv2d); `rtol`:
    the tolerance of the losses and gradients ("G" is held to a tenth of it)."""
    cfg = CycleGANConfig(pool_size=2)
    ours_nets = _cyclegan_nets(norm)
    ref_nets = copy.deepcopy(ours_nets)
    for net in ours_nets.values():
        set_conv_kernels(net, kernels)
    gens, discs = cyclegan.GENERATORS, cyclegan.DISCRIMINATORS
    ours_opt, ref_opt = _optimizers(ours_nets, gens, discs), _optimizers(ref_nets, gens, discs)
    ours_pools, ref_pools = cyclegan.make_pools(cfg, 3), cyclegan.make_pools(cfg, 3)
    ours_calls, ref_calls = _calls(ours_nets), _calls(ref_nets)
    gan, prec = GANLoss(cfg.gan_mode), Precision("none", CPU)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        real_A, real_B = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
        _sync(ours_nets, ours_opt, ref_nets, ref_opt)
        ours, _ = cyclegan.train_step(ours_nets, ours_opt, real_A, real_B, StepTools(gan, cfg, ours_pools, prec, batch_calls))
        ref = reference.cyclegan_step(ref_nets, ref_opt, real_A, real_B, cfg, ref_pools)
        # "G" is the same six terms summed in another order.
        torch.testing.assert_close(ours.pop("G"), ref.pop("G"), rtol=rtol / 10, atol=0)
        _compare_losses(ours, ref, exact=False, rtol=rtol)
        _compare_nets(ours_nets, ref_nets, exact=False, rtol=rtol)
        _compare_norms(ours_nets, ref_nets, rtol=rtol)
    return ours_calls, ref_calls


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_cyclegan_batched_step_equals_the_six_call_iteration(norm):
    """Batched: the same losses, gradients and running statistics as junyanz's six calls. With batch norm
    each call's part is normalised with its own statistics, and the running statistics are updated part
    by part in junyanz's order (G_A sees A, then G_B(B), then B)."""
    ours_calls, ref_calls = _run_cyclegan(norm, batch_calls=True)
    # junyanz: G_A and G_B three calls each, each D three calls (adversarial term, real, fake) per step.
    assert ref_calls == {"G_A": 9, "G_B": 9, "D_A": 9, "D_B": 9}
    # Batched: G_A on A and on [G_B(B), B]; G_B on [G_A(A), B, A]; each D once for G, once on [real, fake].
    assert ours_calls == {"G_A": 6, "G_B": 3, "D_A": 6, "D_B": 6}


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_cyclegan_unbatched_step_makes_the_six_calls(norm):
    ours_calls, ref_calls = _run_cyclegan(norm, batch_calls=False)
    assert ours_calls == ref_calls


@pytest.fixture
def winograd_calls(monkeypatch):
    """Counts the Winograd convolutions by kernel size. The tiny networks (16 channels at 8x8 in the
    residual blocks, PatchGANs of ndf 4) are below `fastconv.worthwhile`, so its size rule is bypassed to
    exercise the path: 3x3 in the residual blocks, 4x4 in the discriminators' two stride-1 layers."""
    calls = {3: 0, 4: 0}
    conv = fastconv.winograd_conv2d

    def counted(x, weight, *a, **kw):
        calls[weight.shape[-1]] += 1
        return conv(x, weight, *a, **kw)
    monkeypatch.setattr(fastconv, "worthwhile", lambda *a: True)
    monkeypatch.setattr(fastconv, "winograd_conv2d", counted)
    return calls


def test_cyclegan_step_with_winograd_convolutions_is_the_same_math(winograd_calls):
    """train.conv_kernels: auto in float64 (Winograd for every 3x3 and 4x4 stride-1 convolution here): the
    batched step with Winograd residual blocks (the weight transforms shared through the cache scope
    included) and discriminators against the same step with F.conv2d, three steps
    from equal states: every gradient to 1e-10, Winograd is exact up to rounding. (The recipe computes
    its L1 terms in float32, `.float()` for autocast, so the losses agree to float32 rounding only.)
    12 residual-block convolutions per generator call, 3 (batched) calls per step; 2 per discriminator
    call, 4 (batched) calls per step."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = CycleGANConfig(pool_size=2)
        wino_nets = _cyclegan_nets("instance")
        direct_nets = copy.deepcopy(wino_nets)
        for net in wino_nets.values():
            set_conv_kernels(net, "auto")
        gens, discs = cyclegan.GENERATORS, cyclegan.DISCRIMINATORS
        wino_opt, direct_opt = _optimizers(wino_nets, gens, discs), _optimizers(direct_nets, gens, discs)
        pools = {"winograd": cyclegan.make_pools(cfg, 3), "direct": cyclegan.make_pools(cfg, 3)}
        gan, prec = GANLoss(cfg.gan_mode), Precision("none", CPU)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            real_A, real_B = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
            _sync(wino_nets, wino_opt, direct_nets, direct_opt)
            losses = {}
            for mode, nets, opt in (("winograd", wino_nets, wino_opt), ("direct", direct_nets, direct_opt)):
                losses[mode], _ = cyclegan.train_step(nets, opt, real_A, real_B,
                                                      StepTools(gan, cfg, pools[mode], prec, True))
            _compare_losses(losses["winograd"], losses["direct"], exact=False, rtol=1e-6)
            _compare_nets(wino_nets, direct_nets, exact=False, rtol=1e-10)
    finally:
        torch.set_default_dtype(before)
    assert winograd_calls == {3: 3 * 3 * 12, 4: 3 * 4 * 2}


def test_cyclegan_step_with_winograd_convolutions_in_float32(winograd_calls):
    """The same in float32, one step, to 1e-4 (float32 Winograd rounds to ~1e-6 of each output, 10x
    F.conv2d's rounding). Not more steps: a rounding difference of that size can flip a ReLU whose input
    is within it of 0, which moves the gradients by far more than the rounding (seen at 1e-3 in the third
    step here); the float64 test above is the exactness check."""
    _run_cyclegan("instance", batch_calls=True, steps=1, kernels="auto", rtol=1e-4)
    assert winograd_calls == {3: 3 * 12, 4: 4 * 2}


def _counting(fn, counts: dict, key: str):
    def counted(*a, **kw):
        counts[key] += 1
        return fn(*a, **kw)
    return counted


@pytest.mark.parametrize("norm, kernels, batch_calls", [("batch", "direct", False), ("batch", "direct", True),
                                                     ("instance", "direct", True), ("batch", "auto", True)])
def test_pix2pix_step_equals_the_reference_iteration(norm, kernels, batch_calls, monkeypatch):
    """pix2pix's own setting (U-Net, batch norm, dropout) with every call kept: bit-identical, dropout
    included. Batched, the discriminator judges fake and real in one call (with batch norm, each half
    normalised with its own statistics); with `train.conv_kernels: auto` the U-Net's inner layers (1x1 to
    8x8 maps here) run as matrix products and the discriminator's 4x4 stride-1 layers by Winograd:
    float-equal. The generator (dropout) is never batched."""
    cfg = Pix2PixConfig()
    torch.manual_seed(7)
    ours_nets = {"G_A": _generator("unet_128", norm, True, 0), "D_A": build_discriminator("basic", 6, 4, 3, norm)}
    ref_nets = copy.deepcopy(ours_nets)                         # before the switch: the reference runs F.conv2d
    for net in ours_nets.values():
        set_conv_kernels(net, kernels)
    monkeypatch.setattr(convkernels, "GEMM_MIN_WEIGHT", 0)     # ngf 4: every weight is small
    fast = {"winograd_conv2d": 0, "winograd_weight": 0, "conv2d_gemm": 0, "conv_transpose2d_gemm": 0}
    if kernels == "auto":                                       # and the PatchGAN's 4x4 stride-1 layers
        monkeypatch.setattr(fastconv, "worthwhile", lambda *a: True)     # take Winograd despite ndf 4
        for module, name in ((fastconv, "winograd_conv2d"), (fastconv, "winograd_weight"), (convkernels, "conv2d_gemm"),
                             (convkernels, "conv_transpose2d_gemm")):
            monkeypatch.setattr(module, name, _counting(getattr(module, name), fast, name))
    ours_opt = _optimizers(ours_nets, pix2pix.GENERATORS, pix2pix.DISCRIMINATORS)
    ref_opt = _optimizers(ref_nets, pix2pix.GENERATORS, pix2pix.DISCRIMINATORS)
    ours_calls, ref_calls = _calls(ours_nets), _calls(ref_nets)
    gan, prec = GANLoss(cfg.gan_mode), Precision("none", CPU)
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        real_A, real_B = (torch.rand(2, 3, 128, 128, generator=g) * 2 - 1 for _ in range(2))
        _sync(ours_nets, ours_opt, ref_nets, ref_opt)
        torch.manual_seed(100 + step)                   # the same dropout masks on both sides
        tools = StepTools(gan, cfg, pix2pix.make_pools(cfg, 0), prec, batch_calls)
        ours, _ = pix2pix.train_step(ours_nets, ours_opt, real_A, real_B, tools)
        torch.manual_seed(100 + step)
        ref = reference.pix2pix_step(ref_nets, ref_opt, real_A, real_B, cfg, pix2pix.make_pools(cfg, 0))
        exact = not batch_calls and kernels == "direct"
        _compare_losses(ours, ref, exact=exact)
        _compare_nets(ours_nets, ref_nets, exact=exact)
        _compare_norms(ours_nets, ref_nets, rtol=0 if exact else 1e-5)
    assert ours_calls["G_A"] == ref_calls["G_A"] == 2
    assert (ref_calls["D_A"], ours_calls["D_A"]) == (6, 4 if batch_calls else 6)
    if kernels == "auto":                        # ours only: both stride-1 layers of every D call, and
        assert fast["winograd_conv2d"] == 2 * ours_calls["D_A"]            # the U-Net's inner levels
        # one weight transform per layer for D's step (judging fake and real), one for G's: 2 steps
        assert fast["winograd_weight"] == 2 * 2 * 2
        assert fast["conv2d_gemm"] > 0 and fast["conv_transpose2d_gemm"] > 0


def test_batchable_networks():
    inorm = _generator("resnet_6blocks", "instance", False, 0)
    assert batchable(inorm, build_discriminator("basic", 3, 4, 3, "instance"))
    assert batchable(build_discriminator("basic", 3, 4, 3, "none"))
    assert batchable(build_discriminator("basic", 3, 4, 3, "batch"))                 # norms.BatchNorm2d
    assert batchable(_generator("unet_128", "batch", False, 0))                      # TaskBatchNorm2d
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert not batchable(inorm, plain) and batchable(plain.eval())                   # would mix the calls
    dropout = _generator("resnet_6blocks", "instance", True, 0)
    assert not batchable(dropout) and batchable(dropout.eval())                     # masks drawn per call


def test_foreach_adam_is_bit_identical_to_the_loop_and_fused_is_float_equal():
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(50, 37, generator=g), torch.randn(64, generator=g)]
    params = {impl: [p.clone().requires_grad_() for p in start] for impl in ADAM_IMPLS}
    opts = {impl: torch.optim.Adam(ps, lr=2e-4, betas=(0.5, 0.999), **adam_options(impl)) for impl, ps in params.items()}
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in start]
        for impl, ps in params.items():
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            opts[impl].step()
    assert all(torch.equal(a, b) for a, b in zip(params["foreach"], params["loop"]))
    assert all(torch.equal(a, b) for a, b in zip(params["auto"], params["loop"]))     # small: PyTorch's loop
    for a, b in zip(params["fused"], params["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="adam_impl"):
        adam_options("lamb")


def test_auto_adam_is_fused_from_two_million_cpu_parameters_only():
    """The embedded suite's optimisers (ngf and ndf 16) stay on PyTorch's loop, so its numbers hold bit for
    bit; a ngf-64 generator's share and a PatchGAN take the fused step."""
    small = [p for p in _generator("resnet_6blocks", "instance", False, 0).parameters()]
    assert adam_options("auto", small) == {} and adam_options("auto", []) == {}
    suite_G = build_generator(GeneratorConfig(netG="resnet_6blocks", ngf=16, norm="instance"))
    suite_D = build_discriminator("basic", 6, 16, 3, "batch")
    assert adam_options("auto", list(suite_G.parameters()) + list(suite_D.parameters())) == {}
    paper_D = build_discriminator("basic", 6, 64, 3, "batch")
    assert adam_options("auto", list(paper_D.parameters())) == {"fused": True}        # 2.8M parameters
    assert adam_options("auto", [torch.empty(3_000_000, device="meta")]) == {}           # not on the CPU
