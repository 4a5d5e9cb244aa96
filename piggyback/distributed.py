"""Process-group setup for torchrun (DDP), in the spirit of pytorch/examples and nanochat `compute_init`.

Backend chosen automatically: NCCL when CUDA is available, gloo on CPU. Without torchrun (no RANK /
WORLD_SIZE in the environment) the same code runs as a single process without a process group.
Multi-node: torchrun's own rendezvous flags, e.g. on every node
``torchrun --nnodes=2 --node_rank=<i> --nproc_per_node=<gpus> --rdzv_backend=c10d
--rdzv_endpoint=<host0>:29500 -m stages.train <task>``; nothing here needs to know.
"""
from __future__ import annotations

import datetime
import os
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, int, torch.device]:
    """Initialise the process group if launched by torchrun; return (rank, local_rank, world_size, device)."""
    if _launched_by_torchrun():
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ["WORLD_SIZE"])
    else:
        rank, local_rank, world_size = 0, 0, 1
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "lower --nproc_per_node to the number of GPUs per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if _launched_by_torchrun() and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return rank, local_rank, world_size, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on global rank 0 (the only process that writes files or logs)."""
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all ranks (same keys, same order, on every rank)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_to_rank0(local: Any) -> Optional[list]:
    """Every rank's `local` as a list on rank 0 (None elsewhere); [local] without a process group."""
    if not is_distributed():
        return [local]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, out, dst=0)
    return out


def wrap(nets: dict[str, torch.nn.Module], device: torch.device, local_rank: int = 0) -> dict[str, torch.nn.Module]:
    """One DistributedDataParallel per network (the networks themselves without a process group).

    Training calls the wrappers, never `.module`, so gradients are synchronised. Buffers are not
    broadcast: the frozen bank is buffers, and copying it every forward would cost a whole model per
    earlier task; BatchNorm statistics are averaged over ranks at the end (`average_running_stats`).
    """
    if not is_distributed():
        return dict(nets)
    from torch.nn.parallel import DistributedDataParallel

    ids = [local_rank] if device.type == "cuda" else None
    with warnings.catch_warnings():   # torch 2.14 deprecates the name; its replacement still syncs at init
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
        return {k: DistributedDataParallel(n, device_ids=ids, broadcast_buffers=False) for k, n in nets.items()}


def cleanup(wait: bool = True) -> None:
    """Wait for every rank (outputs are complete before exit), then tear the process group down.

    ``wait=False`` after an error: a rank that failed alone must not block on the others.
    """
    if is_distributed():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def average_running_stats(nets) -> None:
    """Average the trainable task's BatchNorm running statistics over the ranks, in place.

    DDP runs with ``broadcast_buffers=False`` (the frozen bank is buffers: broadcasting it every forward
    would cost a copy of every earlier task), so each rank's running mean / variance saw only its shard;
    their average is what the checkpoint keeps. Frozen tasks' statistics (``running_mean_<s>``) are equal
    on every rank and untouched.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for net in nets:
        for name, buf in net.named_buffers():
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var") and buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(world)


def check_replicas_agree(nets: dict, what: str = "parameters") -> bool:
    """Raise if any rank's parameters differ from rank 0's (stylegan's check_ddp_consistency).

    DDP keeps replicas identical bit for bit (same averaged gradients, same optimiser steps); a
    difference means gradients were not synchronised (docs/method.md, "DDP bypass") and the checkpoint would be rank 0's alone.
    """
    if not is_distributed():
        return True
    for name, net in nets.items():
        mine = torch.cat([p.detach().reshape(-1).float() for p in net.parameters()])
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        bad = torch.tensor([0.0 if torch.equal(mine, ref) else (mine - ref).abs().max().item()], device=mine.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() != 0:
            raise RuntimeError(f"DDP replicas disagree on {name} {what} (max |diff| {bad.item():.3g}): "
                               "gradients were not synchronised")
    return True
