"""Parameter accounting: what each task adds, what a lifelong model stores, what separate models would cost.

Counts are conv weights + conv biases (docs/method.md, "Parameter growth"; norm parameters are reported separately). Two
independent routes: `growth_table` is analytic (per layer: task 1 costs n*d + bias; task t >= 2 costs
m*d + N_{t-1}*p + bias with N_{t-1} = n + (t-2)*m, docs/method.md, "Lambda per layer") and `measure` counts the
tensors a built network really holds. `piggyback growth` prints the analytic table without training.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .layers import PIGGYBACK_LAYERS, num_unconstrained
from .networks import GeneratorConfig, build_generator, resolve_layer_lams
from .norms import TaskBatchNorm2d


def default_norm(netG: str) -> str:
    """junyanz defaults: CycleGAN's ResNet generators use instance norm, pix2pix's U-Nets batch norm."""
    return "batch" if netG.startswith("unet") else "instance"


# -- measured on a built network -----------------------------------------------------------------------
def _layers(net: nn.Module):
    return [m for m in net.modules() if isinstance(m, PIGGYBACK_LAYERS)]


def _norms(net: nn.Module):
    return [m for m in net.modules() if isinstance(m, TaskBatchNorm2d)]


def full_params(net: nn.Module) -> int:
    """Conv weights + biases of one dense task of this generator (a separate model)."""
    return sum(m.out_channels * m.filter_size + (m.out_channels if m.has_bias else 0) for m in _layers(net))


def norm_params_per_task(net: nn.Module) -> int:
    """BatchNorm affine parameters one task owns (0 with instance norm, which has none)."""
    return sum(2 * m.num_features for m in _norms(net))


def task_params(net: nn.Module, t: int) -> int:
    """Conv tensors task t owns in this network: its new filters, mixing matrix and bias."""
    return sum(v.numel() for m in _layers(net) for v in m.task_state(t).values())


def stored_params(net: nn.Module) -> int:
    """Conv tensors the network stores for all its tasks."""
    return sum(task_params(net, t) for t in range(1, _num_tasks(net) + 1))


def _num_tasks(net: nn.Module) -> int:
    layers = _layers(net)
    return layers[0].num_tasks if layers else 0


def measure(net: nn.Module) -> dict:
    """Counts of a built network as it is now (`new_params` is its last task)."""
    t = _num_tasks(net)
    return {
        "tasks": t,
        "full_params": full_params(net),
        "new_params": task_params(net, t) if t else 0,
        "stored_params": stored_params(net),
        "norm_params_per_task": norm_params_per_task(net),
        "stored_norm_params": norm_params_per_task(net) * t,
    }


# -- analytic ----------------------------------------------------------------------------------------
def layer_new_params(n: int, d: int, bias: bool, lam: float, t: int) -> int:
    """Parameters task t adds to one layer of n filters of size d (docs/method.md)."""
    b = n if bias else 0
    if t == 1:
        return n * d + b
    m = num_unconstrained(lam, n)
    p = n - m
    bank = n + (t - 2) * m                      # N_{t-1}
    return m * d + bank * p + b


def growth_table(
    netG: str = "resnet_9blocks",              # resnet_6blocks | resnet_9blocks | unet_128 | unet_256
    ngf: int = 64,
    tasks: int = 4,                            # Rows: tasks 1..tasks.
    lam: float = 0.25,                         # Lambda of every layer ...
    lam_overrides: Optional[dict] = None,      # ... except these ({"last": 1.0} or {layer name: lambda}).
    norm: Optional[str] = None,                # Default: instance for ResNet, batch for U-Net (junyanz).
    input_nc: int = 3,
    output_nc: int = 3,
    generators: int = 1,                       # 2 for CycleGAN (G_A and G_B): every count doubles.
    method: str = "piggyback",                 # piggyback | separate (lambda 1) | finetune (one slot)
    bias_everywhere: bool = False,             # Count a per-task bias on every conv (see below).
) -> list[dict]:
    """Analytic growth, one row per task: new, stored and separate-model parameter counts.

    Our layers follow junyanz's bias rule: a conv followed by BatchNorm has no bias. The public
    Piggyback code gives every piggyback layer a bias; `bias_everywhere=True` counts that way, which is
    how the published unet_256 row (docs/method.md, "Parameter growth") was computed (5,504 more per
    task: the biases of the 15 of its 16 convs that junyanz builds without one).
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    cfg = GeneratorConfig(netG=netG, input_nc=input_nc, output_nc=output_nc, ngf=ngf,
                          norm=norm or default_norm(netG), lam=lam, lam_overrides=dict(lam_overrides or {}))
    net = build_generator(cfg)                 # 0 tasks: no weights are allocated
    lams = resolve_layer_lams(cfg, net)
    specs = [(m.out_channels, m.filter_size, m.has_bias or bias_everywhere, 1.0 if method == "separate" else lam_)
             for m, lam_ in zip(_layers(net), lams.values())]
    full = sum(layer_new_params(n, d, b, lam_, 1) for n, d, b, lam_ in specs)
    norm_per_task = norm_params_per_task(net)
    rows, stored = [], 0
    for t in range(1, tasks + 1):
        if method == "finetune":               # one slot, re-trained by every task
            new, stored, slots = full, full, 1
        else:
            new = sum(layer_new_params(n, d, b, lam_, t) for n, d, b, lam_ in specs)
            stored, slots = stored + new, t
        rows.append({
            "task": t,
            "new_params": new * generators,
            "stored_params": stored * generators,
            "separate_params": t * full * generators,
            "full_params": full * generators,
            "new_pct": round(100.0 * new / full, 2),
            "stored_pct": round(100.0 * stored / (t * full), 2),
            "new_norm_params": norm_per_task * generators,
            "stored_norm_params": norm_per_task * slots * generators,
            "separate_norm_params": norm_per_task * t * generators,
        })
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    """A readable fixed-width table of `growth_table` rows."""
    head = ["task", "new params", "% of full", "stored", "separate models", "stored/separate", "norm params (stored)"]
    body = [[str(r["task"]), f"{r['new_params']:,}", f"{r['new_pct']:.1f} %", f"{r['stored_params']:,}",
             f"{r['separate_params']:,}", f"{r['stored_pct']:.1f} %", f"{r['stored_norm_params']:,}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [title] if title else []
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
