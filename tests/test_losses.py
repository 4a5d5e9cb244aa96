"""GANLoss, ImagePool and the CycleGAN / pix2pix updates against a hand-written junyanz-style step."""
import copy
import io
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from piggyback.config import CycleGANConfig, Pix2PixConfig
from piggyback.losses import GANLoss, ImagePool
from piggyback.models import Precision, StepTools, cyclegan, pix2pix, recipe


def test_gan_loss_modes():
    pred = torch.randn(2, 1, 5, 5)
    assert torch.allclose(GANLoss("lsgan")(pred, True), ((pred - 1) ** 2).mean())
    assert torch.allclose(GANLoss("lsgan")(pred, False), (pred**2).mean())
    assert torch.allclose(GANLoss("vanilla")(pred, True), F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred)))
    assert torch.allclose(GANLoss("vanilla")(pred, False), F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred)))
    with pytest.raises(ValueError, match="gan_mode"):
        GANLoss("wgan")


def test_image_pool_semantics():
    assert ImagePool(0).query(x := torch.randn(3, 3, 4, 4)).data_ptr() == x.data_ptr()
    pool = ImagePool(4, seed=1)
    first = torch.randn(4, 3, 4, 4, requires_grad=True)
    out = pool.query(first)
    assert torch.equal(out, first) and not out.requires_grad and len(pool) == 4  # fill phase: pass through
    new = torch.randn(64, 3, 4, 4)
    out = pool.query(new)
    # Every output is either the new image at that slot or some earlier image; both kinds occur.
    seen = torch.cat([first.detach(), new])
    from_new = [torch.equal(o, n) for o, n in zip(out, new)]
    assert all(any(torch.equal(o, s) for s in seen) for o in out)
    assert 0 < sum(from_new) < 64


def test_image_pool_state_roundtrip_is_exact():
    pool = ImagePool(3, seed=7)
    for _ in range(5):
        pool.query(torch.randn(2, 1, 2, 2))
    buf = io.BytesIO()
    torch.save(pool.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # snapshots must load without unpickling classes
    twin = ImagePool(3, seed=999)
    twin.load_state_dict(state)
    x = torch.randn(16, 1, 2, 2)
    assert torch.equal(pool.query(x), twin.query(x))
    assert pool.rng.getstate() == twin.rng.getstate()
    with pytest.raises(ValueError, match="pool size"):
        ImagePool(5).load_state_dict(state)


def _net(cin, cout):
    torch.manual_seed(cin * 10 + cout)
    return nn.Sequential(nn.Conv2d(cin, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, cout, 3, padding=1))


def _adam(*nets):
    return torch.optim.Adam([p for n in nets for p in n.parameters()], lr=0.01, betas=(0.5, 0.999))


def test_cyclegan_step_matches_reference_order():
    cfg = CycleGANConfig(pool_size=0)
    nets = {"G_A": _net(3, 3), "G_B": _net(3, 3), "D_A": _net(3, 1), "D_B": _net(3, 1)}
    ref = copy.deepcopy(nets)
    opts = {"G": _adam(nets["G_A"], nets["G_B"]), "D": _adam(nets["D_A"], nets["D_B"])}
    real_A, real_B = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    gan = GANLoss("lsgan")
    losses, visuals = cyclegan.train_step(nets, opts, real_A, real_B, StepTools(gan, cfg, cyclegan.make_pools(cfg, 0), Precision("none", torch.device("cpu")), True))
    assert set(losses) == {"G", "G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B"}
    assert set(visuals) == set(cyclegan.VISUALS)

    # junyanz optimize_parameters, written out: G step with the old D, then D step (x 0.5) on detached fakes.
    G_A, G_B, D_A, D_B = ref["G_A"], ref["G_B"], ref["D_A"], ref["D_B"]
    opt_G, opt_D = _adam(G_A, G_B), _adam(D_A, D_B)
    fake_B, fake_A = G_A(real_A), G_B(real_B)
    mse = lambda p, t: ((p - t) ** 2).mean()  # noqa: E731
    loss_G = (mse(D_A(fake_B), 1) + mse(D_B(fake_A), 1) + 10 * F.l1_loss(G_B(fake_B), real_A) + 10 * F.l1_loss(G_A(fake_A), real_B)
              + 5 * F.l1_loss(G_A(real_B), real_B) + 5 * F.l1_loss(G_B(real_A), real_A))
    opt_G.zero_grad()
    loss_G.backward()
    opt_G.step()
    opt_D.zero_grad()  # also drops the D gradients the G step left behind (the reference freezes D instead)
    loss_D = 0.5 * (mse(D_A(real_B), 1) + mse(D_A(fake_B.detach()), 0)) + 0.5 * (mse(D_B(real_A), 1) + mse(D_B(fake_A.detach()), 0))
    loss_D.backward()
    opt_D.step()
    assert torch.allclose(losses["G"], loss_G.detach(), atol=1e-6)
    assert torch.allclose(losses["D_A"] + losses["D_B"], loss_D.detach(), atol=1e-6)
    for k in nets:
        for p, q in zip(nets[k].parameters(), ref[k].parameters()):
            assert torch.allclose(p, q, atol=1e-6), k


def test_pix2pix_step_matches_reference_order():
    cfg = Pix2PixConfig()
    nets = {"G_A": _net(3, 3), "D_A": _net(6, 1)}
    ref = copy.deepcopy(nets)
    opts = {"G": _adam(nets["G_A"]), "D": _adam(nets["D_A"])}
    real_A, real_B = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    losses, visuals = pix2pix.train_step(nets, opts, real_A, real_B, StepTools(GANLoss("vanilla"), cfg, pix2pix.make_pools(cfg, 0), Precision("none", torch.device("cpu")), True))
    assert set(losses) == {"G", "G_GAN", "G_L1", "D", "D_real", "D_fake"}
    assert set(visuals) == set(pix2pix.VISUALS)

    # D first (on the detached fake), then G against the *updated* D.
    G, D = ref["G_A"], ref["D_A"]
    opt_G, opt_D = _adam(G), _adam(D)
    bce = F.binary_cross_entropy_with_logits
    fake_B = G(real_A)
    p_fake, p_real = D(torch.cat([real_A, fake_B.detach()], 1)), D(torch.cat([real_A, real_B], 1))
    loss_D = 0.5 * (bce(p_fake, torch.zeros_like(p_fake)) + bce(p_real, torch.ones_like(p_real)))
    opt_D.zero_grad()
    loss_D.backward()
    opt_D.step()
    p = D(torch.cat([real_A, fake_B], 1))
    loss_G = bce(p, torch.ones_like(p)) + 100 * F.l1_loss(fake_B, real_B)
    opt_G.zero_grad()
    loss_G.backward()
    opt_G.step()
    assert torch.allclose(losses["D"], loss_D.detach(), atol=1e-6)
    assert torch.allclose(losses["G"], loss_G.detach(), atol=1e-5)
    for k in nets:
        for a, b in zip(nets[k].parameters(), ref[k].parameters()):
            assert torch.allclose(a, b, atol=1e-6), k


def test_generator_step_leaves_discriminator_gradients_alone():
    cfg = CycleGANConfig(pool_size=0, lambda_identity=0.0)
    nets = {"G_A": _net(3, 3), "G_B": _net(3, 3), "D_A": _net(3, 1), "D_B": _net(3, 1)}
    d_opt = _adam(nets["D_A"], nets["D_B"])
    opts = {"G": _adam(nets["G_A"], nets["G_B"]), "D": d_opt}
    # Freeze D's optimiser: after the step, D gradients must be exactly those of the D loss alone.
    d_opt.step = lambda *a, **k: None
    real_A, real_B = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    losses, x = cyclegan.train_step(nets, opts, real_A, real_B, StepTools(
        GANLoss("lsgan"), cfg, cyclegan.make_pools(cfg, 0), Precision("none", torch.device("cpu")), True))
    assert "idt_A" not in losses
    assert all(p.requires_grad for n in ("D_A", "D_B") for p in nets[n].parameters())
    grads = [p.grad.clone() for n in ("D_A", "D_B") for p in nets[n].parameters()]
    d_opt.zero_grad()
    gan = GANLoss("lsgan")
    loss_D = (cyclegan.discriminator_loss(nets["D_A"], real_B, x["fake_B"], gan)["D"]
              + cyclegan.discriminator_loss(nets["D_B"], real_A, x["fake_A"], gan)["D"])
    loss_D.backward()
    for g, p in zip(grads, [p for n in ("D_A", "D_B") for p in nets[n].parameters()]):
        assert torch.allclose(g, p.grad, atol=1e-7)


def test_precision_is_off_on_cpu():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        prec = Precision("bf16", torch.device("cpu"))
    assert prec.dtype is None and prec.scaler is None and any("ignored" in str(x.message) for x in w)
    with pytest.raises(ValueError):
        Precision("fp8", torch.device("cpu"))
    assert recipe("cyclegan") is cyclegan and recipe("pix2pix") is pix2pix
    random.seed(0)
