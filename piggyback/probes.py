"""Forgetting probes: fixed test inputs and the exact outputs each task produced when it was finished.

Piggyback GAN's claim (Zhai et al., ECCV 2020) is zero forgetting: every earlier task is rebuilt exactly
from its stored tensors. Training records, per task and generator, a few test inputs and the outputs of
the frozen network; the audit later reruns them from the final checkpoint and compares bytes (sha256).

Bit-exactness needs the same arithmetic both times, so outputs are always computed by `run_probe`: on
the CPU, float32, eval mode, one thread, the whole input batch in one call.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from piggyback.lifelong import MODES


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's raw bytes (CPU, contiguous), prefixed by dtype and shape."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)};".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # Parallel CPU kernels may split reductions differently with another thread count; one thread
    # gives the same bits whatever machine or launcher (torchrun sets OMP_NUM_THREADS=1) runs it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def run_probe(net: nn.Module, inputs: Tensor) -> Tensor:
    """Outputs of `net` (already switched to the task, e.g. `model.generator(task, which)`) for `inputs`.

    The network is moved to the CPU and left in eval mode.
    """
    net = net.to("cpu").eval()
    with _single_thread():
        return net(inputs.detach().to("cpu", torch.float32).contiguous()).contiguous()


def probe_inputs(prepared_root: str | Path, mode: str, direction: str, size: int, k: int) -> dict[str, Tensor]:
    """The first `k` test inputs of each generator of a task: A side for G_A, B side for G_B."""
    from piggyback.data.datasets import TestSet

    out = {}
    for which in MODES[mode]:
        ts = TestSet(prepared_root, direction=direction, size=size, reverse=which == "G_B", limit=k)
        out[which] = torch.stack([ts[i]["A"] for i in range(len(ts))])  # (k, C, size, size)
    return out


def record_probes(model, task: str, inputs: dict[str, Tensor]) -> dict[str, dict]:
    """Run the finished `task` of `model` on its probe inputs: {which: {"input", "output", "sha256"}}."""
    probes = {}
    for which, x in inputs.items():
        y = run_probe(model.generator(task, which), x)
        probes[which] = {"input": x.detach().cpu().contiguous(), "output": y, "sha256": tensor_sha256(y)}
    return probes


def check_probes(model, probes: dict[str, dict[str, dict]]) -> dict[str, dict[str, bool]]:
    """Rerun every recorded probe on `model`: {task: {which: outputs identical to the recorded bytes}}."""
    result = {}
    for task, per_gen in probes.items():
        result[task] = {}
        for which, p in per_gen.items():
            y = run_probe(model.generator(task, which), p["input"])
            result[task][which] = tensor_sha256(y) == p["sha256"] and torch.equal(y, p["output"])
    return result
