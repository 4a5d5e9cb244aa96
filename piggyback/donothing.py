"""Do-nothing references for every quality table: what a model must beat to be worth anything.

A colourisation model with L1 0.26 looks plausible until one learns that returning the grey input
unchanged scores 0.064. So wherever the true outputs are known, evaluation also scores two trivial
"translators" on the same test split, with the same L1 / PSNR / SSIM code:
  - ``identity_*``: the input returned unchanged;
  - ``mean_target_*``: the per-pixel mean of the training split's target images (the best constant
    image under L2, a fair blind guess for aligned data).
The report shows them beside the model's scores and flags tasks that score worse than either.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from torch import Tensor, nn

REFERENCES = {"identity": "input unchanged", "mean_target": "mean training target"}
SCORES = ("l1", "psnr", "ssim")
LOWER_IS_BETTER = {"l1": True, "psnr": False, "ssim": False}


class ConstantImage(nn.Module):
    """A "generator" that ignores its input and returns one fixed image (C, H, W) for every item."""

    def __init__(self, image: Tensor):
        super().__init__()
        self.register_buffer("image", image)

    def forward(self, x: Tensor) -> Tensor:
        return self.image.expand(x.shape[0], -1, -1, -1)


def mean_target(prepared_root: Union[str, Path], direction: str, size: int, reverse: bool = False) -> Tensor:
    """Per-pixel mean (3, size, size) of the training split's target images, in [-1, 1]."""
    from .data.datasets import train_targets

    total, n = None, 0
    for img in train_targets(prepared_root, direction, size, reverse):
        total = img.double() if total is None else total + img
        n += 1
    return (total / n).float()


def do_nothing_scores(testset, prepared_root: Union[str, Path], direction: str, size: int, reverse: bool = False,
                      batch_size: int = 50, device: Any = None) -> dict[str, Optional[float]]:
    """``identity_<score>`` and ``mean_target_<score>`` on `testset` (a `TestSet`); {} without true outputs."""
    from .scoring import translate_split

    if not testset.has_truth:
        return {}
    nets = {"identity": nn.Identity(),
            "mean_target": ConstantImage(mean_target(prepared_root, direction, size, reverse))}
    out: dict[str, Optional[float]] = {}
    for name, net in nets.items():
        gt = translate_split(net, testset, None, batch_size, device, 0, progress=False).metrics
        out.update({f"{name}_{k}": gt.get(k) for k in SCORES})
    return out


def worse_than_doing_nothing(row: dict) -> list[str]:
    """The references the model scores worse than, with the scores, e.g. ["input unchanged (L1, SSIM)"]."""
    worse = []
    for ref, label in REFERENCES.items():
        scores = []
        for score in SCORES:
            model, base = row.get(score), row.get(f"{ref}_{score}")
            if model is None or base is None:
                continue
            if (model > base) if LOWER_IS_BETTER[score] else (model < base):
                scores.append(score.upper())
        if scores:
            worse.append(f"{label} ({', '.join(scores)})")
    return worse


def reference_markdown(rows: list[dict], fmt) -> str:
    """The summary's "Do-nothing reference" table (tasks with true outputs), with its flags; "" without any."""
    rows = [r for r in rows if any(r.get(f"{ref}_l1") is not None for ref in REFERENCES)]
    if not rows:
        return ""
    head = ["task"] + [f"{s.upper()} {who}" for s in SCORES for who in ("model", "input unchanged", "mean target")] \
        + ["worse than doing nothing"]
    lines = ["## Do-nothing reference", "",
             "The same scores for returning the input unchanged and for the per-pixel mean of the training "
             "targets: a model should beat both (L1 lower, PSNR and SSIM higher).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"]] + [fmt(r.get(k)) for s in SCORES for k in (s, f"identity_{s}", f"mean_target_{s}")]
        worse = worse_than_doing_nothing(r)
        cells.append(("**WORSE** than " + "; ".join(worse)) if worse else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
