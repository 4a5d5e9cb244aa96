"""Import a pretrained junyanz/pytorch-CycleGAN-and-pix2pix generator as task 1 of a lifelong model.

Our generators keep junyanz's module names (junyanz `models/networks.py`), so `model.1.weight` of a
`latest_net_G.pth` becomes task 1's `new_filters` of layer `model.1`, and so on. As junyanz's
`BaseModel.__patch_instance_norm_state_dict` does, stale InstanceNorm running stats of pre-0.4 checkpoints
are dropped; DataParallel's `module.` prefixes are stripped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .accounting import default_norm
from .config import check_name
from .layers import PIGGYBACK_LAYERS
from .lifelong import LifelongModel
from .networks import GeneratorConfig
from .norms import TaskBatchNorm2d

_STALE = ("running_mean", "running_var", "num_batches_tracked")


class ReferenceImportError(ValueError):
    """The state dict does not fit the requested architecture; the message names the key."""


def read_state_dict(source: str | Path | dict) -> dict[str, Tensor]:
    """A junyanz state dict from a path (torch.load, weights_only) or a dict, with `module.` stripped."""
    if isinstance(source, (str, Path)):
        try:
            sd = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unpickling failure against the file
            raise ReferenceImportError(f"{source}: cannot be loaded as a state dict: {e}") from e
    else:
        sd = source
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ReferenceImportError(f"{source if isinstance(source, (str, Path)) else 'state dict'}: "
                                   "expected a flat {key: tensor} state dict (a latest_net_G.pth)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _resolve_config(sd: dict, netG: str, ngf: int, norm: Optional[str], use_dropout: Optional[bool],
                    **kw: Any) -> GeneratorConfig:
    if use_dropout is None:
        # Dropout shifts the second conv of each ResnetBlock from index 5 to 6; U-Net keys do not depend on it
        # and pix2pix trains U-Nets with dropout on.
        use_dropout = "model.10.conv_block.6.weight" in sd if netG.startswith("resnet") else True
    return GeneratorConfig(netG=netG, ngf=ngf, norm=norm or default_norm(netG), use_dropout=use_dropout, **kw)


@torch.no_grad()
def load_into_task(net: nn.Module, sd: dict[str, Tensor], source: str = "state dict") -> None:
    """Copy junyanz tensors into the trainable task of `net`, key by key; unknown/missing keys are errors."""
    sd = dict(sd)
    targets: dict[str, Tensor] = {}
    for name, m in net.named_modules():
        if isinstance(m, PIGGYBACK_LAYERS):
            targets[f"{name}.weight"] = m.new_filters
            if m.has_bias:
                targets[f"{name}.bias"] = m.bias
        elif isinstance(m, TaskBatchNorm2d):
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                targets[f"{name}.{key}"] = getattr(m, key)
        elif isinstance(m, nn.InstanceNorm2d):
            for key in _STALE:                  # pre-0.4 checkpoints: stats that instance norm never uses
                sd.pop(f"{name}.{key}", None)
    for key in targets:
        if key not in sd and not key.endswith("num_batches_tracked"):   # absent from old BatchNorm files
            raise ReferenceImportError(f"{source}: missing key {key!r} (wrong netG, norm or ngf?)")
    for key, value in sd.items():
        if key not in targets:
            raise ReferenceImportError(f"{source}: unexpected key {key!r} (wrong netG, norm or dropout setting?)")
        if targets[key].shape != value.shape:
            raise ReferenceImportError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the "
                                       f"{net.config.netG} with ngf={net.config.ngf} needs {tuple(targets[key].shape)}")
        targets[key].copy_(value)


def import_reference_model(
    sources: dict[str, str | Path | dict],     # {"G_A": latest_net_G(_A).pth[, "G_B": latest_net_G_B.pth]}
    netG: str = "resnet_9blocks",              # Architecture of the pretrained generator(s).
    ngf: int = 64,
    norm: Optional[str] = None,                # Default: instance for ResNet, batch for U-Net (junyanz).
    use_dropout: Optional[bool] = None,        # Default: detected for ResNet; True for U-Net.
    input_nc: int = 3,
    output_nc: int = 3,
    lam: float = 0.25,                         # Lambda of the tasks that follow ...
    lam_overrides: Optional[dict] = None,      # ... and its per-layer overrides.
    method: str = "piggyback",
    name: str = "pretrained",                  # Name of the imported task.
    dataset: Optional[str] = None,
    direction: str = "AtoB",
) -> LifelongModel:
    """A LifelongModel whose finished task 1 is the pretrained generator(s): G_A only (pix2pix-like task)
    or G_A and G_B (a CycleGAN pair)."""
    check_name("task name", name)           # it becomes a path in reports and a key in params
    if "G_A" not in sources or set(sources) - {"G_A", "G_B"}:
        raise ValueError(f"sources: expected keys 'G_A' and optionally 'G_B', got {sorted(sources)}")
    sds = {w: read_state_dict(s) for w, s in sources.items()}
    cfg = _resolve_config(sds["G_A"], netG, ngf, norm, use_dropout, input_nc=input_nc, output_nc=output_nc,
                          lam=lam, lam_overrides=dict(lam_overrides or {}))
    model = LifelongModel(cfg, method)
    nets = model.add_task(name, "cyclegan" if "G_B" in sds else "pix2pix", direction, dataset)
    for which, net in nets.items():
        src = sources[which]
        load_into_task(net, sds[which], str(src) if isinstance(src, (str, Path)) else f"{which} state dict")
    model.finish_task(imported_from={w: str(s) for w, s in sources.items() if isinstance(s, (str, Path))})
    return model


def import_reference(path: str | Path | dict, netG: str = "resnet_9blocks", ngf: int = 64,
                     norm: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """The generator of a junyanz `latest_net_G.pth` as a lifelong network running task 1, in eval mode.

    Its outputs equal the original network's (eval mode). `kwargs` go to `import_reference_model`, which
    returns the whole LifelongModel instead (to save it with `save_lifelong` and train further tasks).
    """
    model = import_reference_model({"G_A": path}, netG=netG, ngf=ngf, norm=norm, **kwargs)
    return model.generator(model.task_names()[0])
