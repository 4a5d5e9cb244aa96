"""Adversarial loss and image pool of CycleGAN / pix2pix (Zhu et al. 2017, Isola et al. 2017).

Matches junyanz/pytorch-CycleGAN-and-pix2pix `models/networks.py: GANLoss` and `util/image_pool.py`;
the pool owns its random generator so that a resume snapshot can restore it exactly.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor, nn


class GANLoss(nn.Module):
    """Loss of a discriminator's prediction map against an all-real or all-fake target.

    ``lsgan``: mean squared error (Mao et al. 2017); ``vanilla``: BCE on logits. The target is a scalar
    expanded over the prediction (per-patch targets of a PatchGAN, mean-reduced).
    """

    def __init__(self, gan_mode: str, target_real: float = 1.0, target_fake: float = 0.0) -> None:
        super().__init__()
        if gan_mode == "lsgan":
            self.loss = nn.MSELoss()
        elif gan_mode == "vanilla":
            self.loss = nn.BCEWithLogitsLoss()
        else:
            raise ValueError(f"gan_mode must be 'lsgan' or 'vanilla', got {gan_mode!r}")
        self.gan_mode = gan_mode
        # Buffers follow the module to the training device; they are constants, not state.
        self.register_buffer("real_label", torch.tensor(target_real), persistent=False)
        self.register_buffer("fake_label", torch.tensor(target_fake), persistent=False)

    def forward(self, prediction: Tensor, target_is_real: bool) -> Tensor:
        target = self.real_label if target_is_real else self.fake_label
        # Under autocast the prediction may be half precision: compute the loss in float32.
        prediction = prediction.float()
        return self.loss(prediction, target.to(prediction.dtype).expand_as(prediction))

    def extra_repr(self) -> str:
        return f"gan_mode={self.gan_mode!r}"


class ImagePool:
    """History of generated images shown to the discriminator (Shrivastava et al. 2017).

    While fewer than `pool_size` images are stored, each new image is stored and returned. Afterwards
    each new image, with probability 1/2, is swapped with a random stored one (the stored one is
    returned), else returned as is. ``pool_size == 0`` disables the pool. Each process keeps its own
    pool; `state_dict()` holds the images and the generator state (plain tensors and ints, so it loads
    with ``torch.load(weights_only=True)``).
    """

    def __init__(self, pool_size: int, seed: int = 0) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}")
        self.pool_size = pool_size
        self.images: list[Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: Tensor) -> Tensor:
        """Return a batch of the same shape as `images` (detached), drawn from the pool."""
        images = images.detach()
        if self.pool_size == 0:
            return images
        out = []
        for image in images:  # (C, H, W) each
            image = image.unsqueeze(0)  # (1, C, H, W)
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.uniform(0, 1) > 0.5:
                i = self.rng.randint(0, self.pool_size - 1)
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        # random.Random.getstate() is (version, tuple of 625 ints, gauss_next): safe for weights_only.
        return {"pool_size": self.pool_size, "images": [t.cpu() for t in self.images], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        if state["pool_size"] != self.pool_size:
            raise ValueError(f"image pool size changed: snapshot {state['pool_size']}, now {self.pool_size}")
        self.images = [t.to(device) if device is not None else t for t in state["images"]]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def __len__(self) -> int:
        return len(self.images)
