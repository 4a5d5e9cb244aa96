"""CycleGAN losses and update (Zhu et al., ICCV 2017), as junyanz `models/cycle_gan_model.py`.

Code (paper): G_A (G: A -> B), G_B (F: B -> A), D_A (D_Y: judges fake_B vs real_B), D_B (D_X: fake_A vs real_A).
Update order: generators first (D frozen), then both discriminators on pooled fakes, D loss x 0.5.
"""
from __future__ import annotations

from torch import Tensor, nn
import torch.nn.functional as F

from piggyback.config import CycleGANConfig
from piggyback.lifelong import reuse_composed_weights
from piggyback.losses import GANLoss, ImagePool
from piggyback.models import StepTools, batchable, set_requires_grad, split_call

GENERATORS = ("G_A", "G_B")
DISCRIMINATORS = ("D_A", "D_B")
VISUALS = ("real_A", "fake_B", "rec_A", "real_B", "fake_A", "rec_B")  # sample-grid rows


def forward(G_A: nn.Module, G_B: nn.Module, real_A: Tensor, real_B: Tensor, identity: bool,
            batched: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(visuals, identity outputs): translations, reconstructions and, with `identity`, G_A(B) and G_B(A).

    junyanz makes six generator calls. The calls through one generator that do not depend on each other
    go together when `batched` (`batchable` generators only): G_A on A (translation), then G_B on
    [G_A(A), B, A] (cycle, translation, identity), then G_A on [G_B(B), B] (cycle, identity): three calls,
    each generator seeing its inputs in junyanz's order (a batch norm's running statistics follow it).
    """
    if not batched:                                  # junyanz's order: a batch norm's running statistics follow it
        fake_B = G_A(real_A)
        rec_A = G_B(fake_B)
        fake_A = G_B(real_B)
        rec_B = G_A(fake_A)
        idt = {"idt_A": G_A(real_B), "idt_B": G_B(real_A)} if identity else {}
    elif identity:
        fake_B = G_A(real_A)
        rec_A, fake_A, idt_B = split_call(G_B, fake_B, real_B, real_A)
        rec_B, idt_A = split_call(G_A, fake_A, real_B)
        idt = {"idt_A": idt_A, "idt_B": idt_B}
    else:
        fake_B = G_A(real_A)
        rec_A, fake_A = split_call(G_B, fake_B, real_B)
        rec_B, idt = G_A(fake_A), {}
    return {"real_A": real_A, "fake_B": fake_B, "rec_A": rec_A, "real_B": real_B, "fake_A": fake_A, "rec_B": rec_B}, idt


def generator_loss(
    x: dict[str, Tensor], idt: dict[str, Tensor], D_A: nn.Module, D_B: nn.Module, gan: GANLoss, cfg: CycleGANConfig
) -> dict[str, Tensor]:
    """Adversarial + cycle (x lambda_A/B) + identity (x lambda_A/B x lambda_identity) losses; "G" is their sum."""
    out = {}
    if idt:
        # G_A should be the identity on B images, G_B on A images (needs input_nc == output_nc).
        out["idt_A"] = F.l1_loss(idt["idt_A"].float(), x["real_B"].float()) * cfg.lambda_B * cfg.lambda_identity
        out["idt_B"] = F.l1_loss(idt["idt_B"].float(), x["real_A"].float()) * cfg.lambda_A * cfg.lambda_identity
    out["G_A"] = gan(D_A(x["fake_B"]), True)
    out["G_B"] = gan(D_B(x["fake_A"]), True)
    out["cycle_A"] = F.l1_loss(x["rec_A"].float(), x["real_A"].float()) * cfg.lambda_A
    out["cycle_B"] = F.l1_loss(x["rec_B"].float(), x["real_B"].float()) * cfg.lambda_B
    out["G"] = sum(out.values())
    return out


def discriminator_loss(D: nn.Module, real: Tensor, fake: Tensor, gan: GANLoss, batched: bool = False) -> dict[str, Tensor]:
    """(GAN(D(real), real) + GAN(D(fake), fake)) x 0.5, `fake` detached (it comes from the pool).

    `batched` (a `batchable` D only): one call on [real, fake], the same predictions as two calls.
    """
    fake = fake.detach()
    pred_real, pred_fake = split_call(D, real, fake) if batched else (D(real), D(fake))
    real_loss, fake_loss = gan(pred_real, True), gan(pred_fake, False)
    return {"real": real_loss, "fake": fake_loss, "D": (real_loss + fake_loss) * 0.5}


def train_step(nets: dict[str, nn.Module], optimizers: dict, real_A: Tensor, real_B: Tensor,
               tools: StepTools) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One iteration: returns (detached losses, detached visuals). `nets` are the DDP wrappers.

    `tools.batch_calls`: batch the independent calls through one network where that network is `batchable`
    (no active dropout; batch norms normalise each call's part with its own statistics, so no
    statistics mix the images of different calls).
    """
    G_A, G_B, D_A, D_B = (nets[k] for k in ("G_A", "G_B", "D_A", "D_B"))
    gan, cfg, pools, prec, batch_calls = tools.gan, tools.cfg, tools.pools, tools.prec, tools.batch_calls
    batch_G = batch_calls and batchable(G_A, G_B)
    batch_D = batch_calls and batchable(D_A, D_B)

    # Generators: D frozen so its parameters collect no gradient from the adversarial terms. Each G runs
    # three times (translation, cycle, identity); its piggyback weights are composed once.
    with reuse_composed_weights(G_A, G_B):
        with prec.autocast():
            x, idt = forward(G_A, G_B, real_A, real_B, cfg.lambda_identity > 0, batch_G)
        set_requires_grad([D_A, D_B], False)
        optimizers["G"].zero_grad(set_to_none=True)
        with prec.autocast():
            g = generator_loss(x, idt, D_A, D_B, gan, cfg)
        prec.backward(g["G"])
    prec.step(optimizers["G"])

    # Discriminators: D_A on real_B vs pooled fake_B, D_B on real_A vs pooled fake_A.
    set_requires_grad([D_A, D_B], True)
    optimizers["D"].zero_grad(set_to_none=True)
    with prec.autocast(), reuse_composed_weights(D_A, D_B):
        d_A = discriminator_loss(D_A, real_B, pools["fake_B"].query(x["fake_B"]), gan, batch_D)
        d_B = discriminator_loss(D_B, real_A, pools["fake_A"].query(x["fake_A"]), gan, batch_D)
    prec.backward(d_A["D"] + d_B["D"])  # == backward of each: the two Ds share no parameters
    prec.step(optimizers["D"])
    prec.update()

    losses = {k: v.detach() for k, v in g.items()}
    losses["D_A"], losses["D_B"] = d_A["D"].detach(), d_B["D"].detach()
    return losses, {k: v.detach() for k, v in x.items()}


def make_pools(cfg: CycleGANConfig, seed: int) -> dict[str, ImagePool]:
    return {"fake_B": ImagePool(cfg.pool_size, seed), "fake_A": ImagePool(cfg.pool_size, seed + 1)}
