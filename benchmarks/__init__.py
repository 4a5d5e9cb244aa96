"""Speed and memory benchmarks of the piggyback library against plain PyTorch baselines.

Run ``python -m benchmarks`` (about 20 minutes on a 2-core CPU) or ``python -m benchmarks --quick`` (a few
minutes); ``--device cuda`` (the default when a GPU is present) runs every candidate with bf16 autocast,
channels_last and cuDNN autotuning; on a CPU float32 NCHW with one thread per core (channels_last was
slower for these networks on the CPU measured, see ``--channels-last``). Every comparison runs both candidates in the same process, interleaved round by round after a
warm-up, so the *ratios* hold on a noisy machine even when the absolute times drift. The command prints
a short table and writes ``benchmarks/results/latest.json`` (git-ignored). What each number means:

- ``train_overhead_task3``: median time of one generator training step (forward, L1 loss to a target,
  backward, Adam step; batch 1) of the piggyback network training task 3 (tasks 1-2 frozen; trainable:
  task 3's new filters, mixing matrices and biases) over the same step of the same architecture built
  from plain nn.Conv2d / nn.ConvTranspose2d / nn.BatchNorm2d holding task 3's dense weights. The headline
  value is resnet_9blocks at 256x256 (128x128 with ``--quick``); every case's ratio is in ``train``.
  Discriminators are plain convolutions for both methods: they would add the same time to both sides and
  only dilute the ratio, so they are left out here (the generator-only ratio is the worst case). The full
  run also times the real recipe, ``cyclegan.train_step`` / ``pix2pix.train_step`` with discriminators,
  image pools and GAN losses (``train_recipe``; CycleGAN calls each generator three times per iteration).
- ``recipe_vs_reference_task3`` (per case): one full iteration of our recipe training task 3, as
  training runs it (independent calls through one network batched, training's default kernels and Adam),
  over the straightforward iteration of ``benchmarks/reference.py`` (junyanz's structure: six generator
  calls, separate discriminator calls for real and fake, float32, eager, default Adam) on plain networks
  holding the same weights (reference, plain and task 3 interleaved on their own, after two warm-up
  rounds). Each case runs in a fresh interpreter, so its ratio does not depend on the cases before it;
  ``recipe_vs_reference_task3_kept_heap`` is the same measured in a second fresh interpreter with glibc
  told to keep freed memory (``runner.KEPT_HEAP_ENV``), the state of a long-lived process.
  ``levers`` in each ``train_recipe`` case: our step one switch away from the default (``unbatched``,
  ``adam_default``, ``adam_foreach``, ``channels_last``, ``direct_kernels``) over the default step, a
  second interleave (``lever_timings``).
- ``infer_overhead``: a materialised task-3 network (``lifelong.materialize``) against an independently
  built plain network with the same weights (eval mode, inference mode, batch 1; resnet_9blocks at 256x256,
  128x128 with ``--quick``; every case in ``infer``). The piggyback network run directly (weights composed
  on every call) is reported beside it.
- ``feature_speedup`` / ``frechet_speedup`` / ``frechet_rel_diff``: ``piggyback.fid`` against pytorch-fid
  (``get_activations`` on the same PNG files, ``calculate_frechet_distance`` at 2048-d). The Inception has
  random weights (the FID weights cannot be downloaded here): these are timings, never FID values.
- ``pipeline``: ``dvc repro`` end to end in a temporary git + DVC copy of the repo, then a no-op repro.
- ``memory``: peak RSS of each candidate, each measured alone in a fresh subprocess (CUDA: max allocated).
- ``growth``: the analytic parameter-growth tables (resnet_9blocks, unet_256; 10 tasks; several lambdas).

What is independent and what is the library's: the baselines are written here on purpose, so that a
library bug cannot hide in both sides of a ratio. ``nets.plain_copy`` rebuilds each generator from
plain ``torch.nn`` layers (not ``lifelong.materialize``), and ``reference.py`` is the whole iteration
written without ``piggyback.models`` (its own GAN loss, gradient toggles and optimiser). Everything that
is not under test reuses the library: the generator and discriminator builders, the image pool, the
recipe configs, the order choice (``order_for``), mixed precision (``models.Precision``), the Adam
implementation switch and the atomic JSON writer. What remains here is measurement itself: interleaved
timing, load and environment records, peak memory in a fresh process, and the ``dvc repro`` copy.
"""
from __future__ import annotations

from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST = RESULTS_DIR / "latest.json"
FORMAT_VERSION = 1
