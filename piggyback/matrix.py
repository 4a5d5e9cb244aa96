"""The task-by-task matrix of continual learning: R[i][j] = quality of task j with the checkpoint of task i.

After each task i the pipeline keeps its checkpoint (models/<task i>); every learned task j <= i is scored
again with it on j's test split (G_A, ground-truth L1 / PSNR / SSIM). Two summaries follow the usual
continual-learning definitions: the average final quality (mean of the last row) and backward transfer
(mean over earlier tasks of R[last][j] - R[j][j]: 0 when nothing is forgotten; for L1, positive is worse).

Only what changed is evaluated: a score is keyed by the hashes of every stored tensor the task's generator
reads (its own slot and the bank slots before it), so piggyback's and the separate models' earlier tasks,
bit-identical in later checkpoints, reuse their scores; the diagonal is the evaluate stage's own number.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from .checkpoint import load_lifelong
from .fsutil import atomic_path
from .lifelong import LifelongModel, task_hash

METRICS = ("l1", "psnr", "ssim")
LOWER_IS_BETTER = {"l1": True, "psnr": False, "ssim": False}
Scorer = Callable[[LifelongModel, str], dict]   # (model, task) -> {"l1", "psnr", "ssim"}


def state_key(model: LifelongModel, task: str) -> str:
    """sha256 over the hashes of every slot G_A runs `task` with (1..its own): equal keys, equal outputs."""
    net, slot = model.generators["G_A"], model.task(task)["index"]["G_A"]
    h = hashlib.sha256(task.encode())
    for s in range(1, slot + 1):
        h.update(task_hash(net, s).encode())
    return h.hexdigest()


def test_split_scorer(data_root: Union[str, Path], size: Union[int, Mapping[str, int]], batch_size: int = 50,
                      num_test: int = 0, device: Any = None) -> Scorer:
    """Score a task of a model on its prepared test split, as the evaluate stage does (G_A, no files);
    `size`: the test size, or per task (its dataset's crop_size)."""
    from .data.datasets import TestSet
    from .scoring import translate_split

    def score(model: LifelongModel, task: str) -> dict:
        record = model.task(task)
        data_dir = Path(data_root) / str(record.get("dataset"))
        if not data_dir.is_dir():
            raise FileNotFoundError(f"{data_dir} not found: run `dvc repro prepare@{record.get('dataset')}`")
        task_size = size[task] if isinstance(size, Mapping) else size
        testset = TestSet(data_dir, record["direction"], task_size, limit=num_test)
        m = translate_split(model.materialize(task, "G_A"), testset, None, batch_size, device, 0, False).metrics
        return {k: m.get(k) for k in METRICS}
    return score


def _diagonal(metrics_dir: Optional[Path], task: str) -> Optional[dict]:
    """The evaluate stage's scores of `task` right after training, when its metrics file has them."""
    if metrics_dir is None:
        return None
    try:
        m = json.loads((metrics_dir / "tasks" / f"{task}.json").read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{metrics_dir / 'tasks' / f'{task}.json'}: not valid JSON ({e})") from e
    return {k: m.get(k) for k in METRICS} if m.get("l1") is not None else None


def task_matrix(order: list[str], models_dir: Union[str, Path], score: Scorer,
                metrics_dir: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """R[i][j] for every metric (None above the diagonal), its summaries, and how many scores were computed.

    Args:
        order: the tasks in training order; models_dir/<task> is the checkpoint written after each.
        score: how to score one task of a model (`test_split_scorer`).
        metrics_dir: where the evaluate stage wrote tasks/<task>.json (the diagonal); None: compute it.
    """
    models_dir = Path(models_dir)
    metrics_dir = Path(metrics_dir) if metrics_dir is not None else None
    cache: dict[str, dict] = {}
    rows, evaluated, method = [], 0, None
    for i, ti in enumerate(order):
        model = load_lifelong(models_dir / ti)
        method = model.method
        row = []
        for tj in order[: i + 1]:
            key = state_key(model, tj)
            if key not in cache:
                diagonal = _diagonal(metrics_dir, tj) if tj == ti else None
                cache[key] = diagonal or score(model, tj)
                evaluated += diagonal is None
            row.append(cache[key])
        rows.append(row)
    n = len(order)
    matrix = {m: [[rows[i][j][m] if j <= i else None for j in range(n)] for i in range(n)] for m in METRICS}
    return {"method": method, "tasks": list(order), "metrics": matrix,
            "summary": {m: summarize(matrix[m]) for m in METRICS},
            "evaluated": int(evaluated), "reused": n * (n + 1) // 2 - int(evaluated)}


def summarize(r: list[list[Optional[float]]]) -> dict[str, Optional[float]]:
    """final_mean: mean of the last row; bwt: mean over j < last of R[last][j] - R[j][j] (None: one task)."""
    if not r:
        return {"final_mean": None, "bwt": None}
    last = r[-1]
    final = [v for v in last if v is not None]
    changes = [last[j] - r[j][j] for j in range(len(r) - 1) if None not in (last[j], r[j][j])]
    return {"final_mean": sum(final) / len(final) if len(final) == len(last) else None,
            "bwt": sum(changes) / len(changes) if changes and len(changes) == len(r) - 1 else None}


def matrix_metrics(matrix: Optional[dict]) -> dict[str, float]:
    """Flat MLflow metrics of a matrix's summaries: bwt_<metric>, final_mean_<metric>."""
    out = {}
    for m, s in ((matrix or {}).get("summary") or {}).items():
        for k, v in s.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[f"{k}_{m}"] = float(v)
    return out


def matrix_figure(matrices: list[dict], path: Union[str, Path], metric: str = "l1") -> Path:
    """One heatmap of R[i][j] (`metric`) per matrix (per method), side by side, with the values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices) + 0.6, 3.4), squeeze=False)
    cmap = "viridis_r" if LOWER_IS_BETTER[metric] else "viridis"
    values = [v for mx in matrices for row in mx["metrics"][metric] for v in row if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    for k, (ax, mx) in enumerate(zip(axes[0], matrices)):
        r, names = mx["metrics"][metric], mx["tasks"]
        grid = np.array([[np.nan if v is None else v for v in row] for row in r], dtype=float)
        im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi)
        for i, row in enumerate(r):
            for j, v in enumerate(row):
                if v is not None:   # dark text on the light (yellow) end of the colour map
                    frac = (v - lo) / ((hi - lo) or 1.0)
                    light = frac < 0.5 if LOWER_IS_BETTER[metric] else frac > 0.5
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8, color="black" if light else "white")
        bwt = mx["summary"][metric]["bwt"]
        ax.set(title=f"{mx['method']}: BWT {'n/a' if bwt is None else f'{bwt:+.3g}'}", xticks=range(len(names)),
               yticks=range(len(names)), xticklabels=names, yticklabels=names,
               xlabel="task scored (j)", ylabel="checkpoint after task (i)" if k == 0 else "")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=metric.upper() + (" (lower is better)"
                                                                             if LOWER_IS_BETTER[metric] else ""))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
