"""pix2pix losses and update (Isola et al., CVPR 2017), as junyanz `models/pix2pix_model.py`.

One generator G (stored as G_A: A -> B) and a conditional discriminator D that sees cat(A, B).
Update order: discriminator first (on the detached fake), then the generator (D frozen): GAN + L1 x lambda_L1.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from piggyback.config import Pix2PixConfig
from piggyback.lifelong import reuse_composed_weights
from piggyback.losses import GANLoss, ImagePool
from piggyback.models import StepTools, batchable, set_requires_grad, split_call

GENERATORS = ("G_A",)
DISCRIMINATORS = ("D_A",)
VISUALS = ("real_A", "fake_B", "real_B")  # input, output, ground truth


def discriminator_loss(D: nn.Module, real_AB: Tensor, fake_AB: Tensor, gan: GANLoss,
                       batched: bool = False) -> dict[str, Tensor]:
    """(GAN(D(cat(A, fake_B)), fake) + GAN(D(cat(A, real_B)), real)) x 0.5, the fake detached from G.

    `batched` (a `batchable` D: its batch norms keep the two halves' statistics apart): one call on
    [fake, real], the same predictions and running-statistics updates as the two calls, in their order.
    """
    fake_AB = fake_AB.detach()
    pred_fake, pred_real = split_call(D, fake_AB, real_AB) if batched else (D(fake_AB), D(real_AB))
    fake_loss = gan(pred_fake, False)
    real_loss = gan(pred_real, True)
    return {"D_real": real_loss, "D_fake": fake_loss, "D": (real_loss + fake_loss) * 0.5}


def generator_loss(D: nn.Module, real_A: Tensor, real_B: Tensor, fake_B: Tensor, gan: GANLoss, cfg: Pix2PixConfig) -> dict[str, Tensor]:
    """GAN(D(A, fake_B), real) + L1(fake_B, real_B) x lambda_L1; "G" is their sum."""
    out = {"G_GAN": gan(D(torch.cat([real_A, fake_B], 1)), True)}
    out["G_L1"] = F.l1_loss(fake_B.float(), real_B.float()) * cfg.lambda_L1
    out["G"] = out["G_GAN"] + out["G_L1"]
    return out


def train_step(nets: dict[str, nn.Module], optimizers: dict, real_A: Tensor, real_B: Tensor,
               tools: StepTools) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One iteration: returns (detached losses, detached visuals). `nets` are the DDP wrappers.

    `tools.batch_calls`: D judges the fake and the real pair in one call (`batchable`; with pix2pix's batch
    norm each half is normalised with its own statistics, as in the two calls).
    """
    G, D = nets["G_A"], nets["D_A"]
    gan, cfg, pools, prec, batch_calls = tools.gan, tools.cfg, tools.pools, tools.prec, tools.batch_calls
    with prec.autocast():
        fake_B = G(real_A)

    # Discriminator on cat(A, fake_B) and cat(A, real_B). The pool (size 0 in the reference: identity)
    # stores the concatenated pair, so a pooled fake keeps its own input (as the original Lua pix2pix).
    set_requires_grad([D], True)
    optimizers["D"].zero_grad(set_to_none=True)
    with prec.autocast(), reuse_composed_weights(D):       # one Winograd transform for both calls
        fake_AB = pools["fake_AB"].query(torch.cat([real_A, fake_B], 1))
        d = discriminator_loss(D, torch.cat([real_A, real_B], 1), fake_AB, gan, batch_calls and batchable(D))
    prec.backward(d["D"])
    prec.step(optimizers["D"])

    # Generator, D frozen.
    set_requires_grad([D], False)
    optimizers["G"].zero_grad(set_to_none=True)
    with prec.autocast():
        g = generator_loss(D, real_A, real_B, fake_B, gan, cfg)
    prec.backward(g["G"])
    prec.step(optimizers["G"])
    prec.update()

    losses = {k: v.detach() for k, v in {**g, **d}.items()}
    return losses, {"real_A": real_A, "fake_B": fake_B.detach(), "real_B": real_B}


def make_pools(cfg: Pix2PixConfig, seed: int) -> dict[str, ImagePool]:
    return {"fake_AB": ImagePool(cfg.pool_size, seed)}
