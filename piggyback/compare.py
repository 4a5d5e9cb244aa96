"""Methods side by side over seeds: every finished pipeline run of this suite in MLflow, grouped by method.

A suite is everything a pipeline run is configured with except `train.method` and `base.seed`
(`report.suite_signature`), so runs of another suite never mix in. Per method and seed the newest finished
run counts and the run being reported stands for its own seed: re-running a report never counts a seed twice.
Each per-task number (and the task matrix's summaries) becomes mean, sample standard deviation and n.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from piggyback.config import Params
from piggyback.fsutil import atomic_path
from piggyback.matrix import matrix_metrics
from piggyback.report import _finite, _fmt

# Per-task numbers compared across methods (piggyback / separate / finetune), read back from MLflow.
COMPARED = ("fid", "kid", "l1", "psnr", "ssim", "final_l1", "forgetting_l1", "stored_params",
            "forgetting_max_abs_diff")
MATRIX = ("final_mean_l1", "bwt_l1", "final_mean_psnr", "bwt_psnr", "final_mean_ssim", "bwt_ssim")
METHOD_ORDER = ("piggyback", "separate", "finetune")


def stats(values: list[Optional[float]]) -> dict[str, Optional[float]]:
    """mean, sample standard deviation (n >= 2) and n of the available values."""
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return {"mean": mean, "std": std, "n": len(v)}


def _this_run(summary: dict) -> dict:
    return {"tasks": {r["name"]: {k: _finite(r.get(k)) for k in COMPARED} for r in summary["tasks"]},
            "matrix": matrix_metrics(summary.get("matrix"))}


def _logged_run(run: Any, tasks: list[str]) -> dict:
    metrics = run.data.metrics
    return {"tasks": {t: {k: _finite(metrics.get(f"{k}/{t}")) for k in COMPARED} for t in tasks},
            "matrix": {k: _finite(metrics.get(k)) for k in MATRIX}}


def pipeline_runs(params: Params, suite: str) -> list[Any]:
    """Every FINISHED MLflow pipeline run with this suite signature, newest first."""
    import mlflow

    from piggyback import tracking

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(params.mlflow))
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000,
                                   filter_string=f"tags.kind = 'pipeline' and tags.suite = '{suite}' "
                                                 "and attributes.status = 'FINISHED'"))


def compare_methods(summary: dict, params: Params) -> dict:
    """This run beside every finished run of the same suite: per method the seeds used, run ids, and per task
    ``{metric: {"mean", "std", "n"}}`` (`COMPARED`); per method the matrix summaries (`MATRIX`) likewise."""
    own, tasks = summary["method"], [r["name"] for r in summary["tasks"]]
    by_method: dict[str, dict[str, tuple[Optional[str], dict]]] = {}   # method -> seed -> (run id, values)
    if params.mlflow.enabled:
        for run in pipeline_runs(params, summary["suite"]):     # newest first: it stands for its seed
            seed = run.data.params.get("base.seed") or f"run {run.info.run_id}"
            seeds = by_method.setdefault(run.data.tags.get("method", "?"), {})
            if seed not in seeds:
                seeds[seed] = (run.info.run_id, _logged_run(run, tasks))
    by_method.setdefault(own, {})[str(params.base.seed)] = (None, _this_run(summary))
    methods = [m for m in METHOD_ORDER if m in by_method] + sorted(set(by_method) - set(METHOD_ORDER))
    values = {m: [v for _, v in by_method[m].values()] for m in methods}
    return {
        "suite": summary["suite"], "methods": methods,
        "seeds": {m: sorted(by_method[m], key=lambda x: (not x.isdigit(), x.zfill(12))) for m in methods},
        "runs": {m: [rid or "this run" for rid, _ in by_method[m].values()] for m in methods},
        "tasks": [{"name": t, **{m: {k: stats([v["tasks"][t][k] for v in values[m]]) for k in COMPARED}
                                 for m in methods}} for t in tasks],
        "matrix": {m: {k: stats([v["matrix"].get(k) for v in values[m]]) for k in MATRIX} for m in methods},
    }


def _pm(s: dict, digits: str = ".4g") -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:{digits}}" + ("" if s["std"] is None else f" ± {s['std']:{digits}}")


def comparison_markdown(comparison: dict) -> str:
    """The side-by-side table: per task and method mean ± std over seeds, and the matrix summaries."""
    head = ["task", "method", "n", "L1", "PSNR", "SSIM", "FID", "KID", "L1 at the end", "forgetting (L1 change)",
            "stored params"]
    lines = ["## Methods side by side", "",
             "Every finished run of this suite in MLflow, newest per method and seed (mean ± sample std over "
             "seeds; add runs with `dvc exp run -S base.seed=1 -S train.method=separate` or `finetune`).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in comparison["tasks"]:
        for m in comparison["methods"]:
            v = t[m]
            cells = [t["name"], m, str(v["l1"]["n"] or v["stored_params"]["n"])]
            cells += [_pm(v[k]) for k in ("l1", "psnr", "ssim", "fid", "kid", "final_l1", "forgetting_l1")]
            stored = v["stored_params"]["mean"]
            lines.append("| " + " | ".join(cells + [_fmt(int(stored)) if stored is not None else "n/a"]) + " |")
    lines += ["", "| method | seeds | average final L1 | backward transfer (L1) | average final SSIM | "
              "backward transfer (SSIM) |", "|---|---|---|---|---|---|"]
    for m in comparison["methods"]:
        s = comparison["matrix"][m]
        lines.append(f"| {m} | {', '.join(map(str, comparison['seeds'][m]))} | {_pm(s['final_mean_l1'])} | "
                     f"{_pm(s['bwt_l1'])} | {_pm(s['final_mean_ssim'])} | {_pm(s['bwt_ssim'])} |")
    lines += ["", "Backward transfer: mean change of each earlier task from right after its training to the end "
              "(metrics/matrix.json); 0 is no forgetting, positive L1 / negative SSIM is worse."]
    return "\n".join(lines) + "\n"


def comparison_plot(plt: Any, comparison: dict, path: Path) -> Path:
    """Stored parameters after each task, and L1 after training vs at the end (mean ± std over seeds)."""
    names, methods = [t["name"] for t in comparison["tasks"]], comparison["methods"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / max(len(methods), 1)
    nan = float("nan")
    for i, m in enumerate(methods):
        col = {k: [t[m][k] for t in comparison["tasks"]] for k in ("stored_params", "l1", "final_l1")}
        ax1.plot(names, [s["mean"] / 1e6 if s["mean"] is not None else nan for s in col["stored_params"]], "o-", label=m)
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(names))]
        n = max(s["n"] for s in col["l1"])
        ax2.bar(xs, [s["mean"] if s["mean"] is not None else nan for s in col["final_l1"]], width,
                yerr=[s["std"] or 0.0 for s in col["final_l1"]], capsize=3, label=f"{m} (end, n={n})", alpha=0.85)
        ax2.errorbar(xs, [s["mean"] if s["mean"] is not None else nan for s in col["l1"]],
                     yerr=[s["std"] or 0.0 for s in col["l1"]], fmt="_", markersize=14, color="black", zorder=3)
    ax1.set(title="Stored parameters after each task", xlabel="after task", ylabel="M")
    ax2.set(title="L1 at the end (bars), after training (ticks); mean ± std", xticks=range(len(names)),
            xticklabels=names, ylabel="L1 (lower is better)")
    ax1.legend()
    ax2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
