"""The straightforward iteration a user would otherwise run: junyanz's `optimize_parameters`, written plainly.

Independent of `piggyback.models` on purpose: it is the baseline the recipes are timed against
(``recipe_vs_reference_task3``) and the iteration tests/test_step_equality.py checks them against. It
follows junyanz/pytorch-CycleGAN-and-pix2pix (`cycle_gan_model.py`, `pix2pix_model.py`): six generator
calls per CycleGAN iteration, separate discriminator calls for the real and the fake image, float32,
eager, `torch.optim.Adam` with its default implementation. Only the image pool is the library's (the
same algorithm as junyanz's `ImagePool`, so that a test can give both sides the same random draws).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from piggyback.losses import ImagePool


def gan_loss(prediction: Tensor, real: bool, gan_mode: str) -> Tensor:
    """junyanz GANLoss: MSE (lsgan) or BCE on logits (vanilla) against an all-1 or all-0 target."""
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    if gan_mode == "lsgan":
        return F.mse_loss(prediction, target)
    return F.binary_cross_entropy_with_logits(prediction, target)


def _requires_grad(nets: Iterable[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def adam(params: Iterable[nn.Parameter], lr: float = 2e-4, betas: tuple = (0.5, 0.999)) -> torch.optim.Optimizer:
    """junyanz's optimiser: torch.optim.Adam, default implementation for the device."""
    return torch.optim.Adam(params, lr=lr, betas=betas)


def cyclegan_step(nets: dict[str, nn.Module], opt: dict[str, torch.optim.Optimizer], real_A: Tensor, real_B: Tensor,
                  cfg, pools: dict[str, ImagePool]) -> dict[str, Tensor]:
    """One CycleGAN iteration (cfg: a CycleGANConfig); returns the detached losses."""
    G_A, G_B, D_A, D_B = (nets[k] for k in ("G_A", "G_B", "D_A", "D_B"))
    fake_B = G_A(real_A)
    rec_A = G_B(fake_B)
    fake_A = G_B(real_B)
    rec_B = G_A(fake_A)

    _requires_grad([D_A, D_B], False)
    opt["G"].zero_grad()
    loss = {}
    if cfg.lambda_identity > 0:
        loss["idt_A"] = F.l1_loss(G_A(real_B), real_B) * cfg.lambda_B * cfg.lambda_identity
        loss["idt_B"] = F.l1_loss(G_B(real_A), real_A) * cfg.lambda_A * cfg.lambda_identity
    loss["G_A"] = gan_loss(D_A(fake_B), True, cfg.gan_mode)
    loss["G_B"] = gan_loss(D_B(fake_A), True, cfg.gan_mode)
    loss["cycle_A"] = F.l1_loss(rec_A, real_A) * cfg.lambda_A
    loss["cycle_B"] = F.l1_loss(rec_B, real_B) * cfg.lambda_B
    loss["G"] = loss["G_A"] + loss["G_B"] + loss["cycle_A"] + loss["cycle_B"]
    if cfg.lambda_identity > 0:
        loss["G"] = loss["G"] + loss["idt_A"] + loss["idt_B"]
    loss["G"].backward()
    opt["G"].step()

    _requires_grad([D_A, D_B], True)
    opt["D"].zero_grad()
    for D, real, fake, key in ((D_A, real_B, pools["fake_B"].query(fake_B), "D_A"),
                               (D_B, real_A, pools["fake_A"].query(fake_A), "D_B")):
        loss_real = gan_loss(D(real), True, cfg.gan_mode)
        loss_fake = gan_loss(D(fake.detach()), False, cfg.gan_mode)
        loss[key] = (loss_real + loss_fake) * 0.5
        loss[key].backward()
    opt["D"].step()
    return {k: v.detach() for k, v in loss.items()}


def pix2pix_step(nets: dict[str, nn.Module], opt: dict[str, torch.optim.Optimizer], real_A: Tensor, real_B: Tensor,
                 cfg, pools: dict[str, ImagePool]) -> dict[str, Tensor]:
    """One pix2pix iteration (cfg: a Pix2PixConfig): D first on the detached fake, then G; detached losses."""
    G, D = nets["G_A"], nets["D_A"]
    fake_B = G(real_A)

    _requires_grad([D], True)
    opt["D"].zero_grad()
    fake_AB = pools["fake_AB"].query(torch.cat((real_A, fake_B), 1))
    loss = {"D_fake": gan_loss(D(fake_AB.detach()), False, cfg.gan_mode)}
    loss["D_real"] = gan_loss(D(torch.cat((real_A, real_B), 1)), True, cfg.gan_mode)
    loss["D"] = (loss["D_fake"] + loss["D_real"]) * 0.5
    loss["D"].backward()
    opt["D"].step()

    _requires_grad([D], False)
    opt["G"].zero_grad()
    loss["G_GAN"] = gan_loss(D(torch.cat((real_A, fake_B), 1)), True, cfg.gan_mode)
    loss["G_L1"] = F.l1_loss(fake_B, real_B) * cfg.lambda_L1
    loss["G"] = loss["G_GAN"] + loss["G_L1"]
    loss["G"].backward()
    opt["G"].step()
    return {k: v.detach() for k, v in loss.items()}


STEPS: dict[str, Callable] = {"cyclegan": cyclegan_step, "pix2pix": pix2pix_step}
