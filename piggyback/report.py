"""The pipeline's summary: one row per task (quality, parameter growth, forgetting), as JSON, Markdown,
CSV for DVC plots, PNG plots, and one MLflow "pipeline" run that links the per-task runs.

The task list comes from params.yaml, never from globbing metrics/: files of removed tasks linger
(DVC issue 5293). Every number is read from the stage outputs (metrics/, models/<last>/meta.json),
because stages restored from DVC's run cache log nothing to MLflow themselves.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

from piggyback.config import Params
from piggyback.donothing import REFERENCES, SCORES, reference_markdown
from piggyback.fsutil import atomic_path, atomic_write_json, atomic_write_text
from piggyback.matrix import matrix_metrics
from piggyback.metricsfile import numbers_only, read_record
from piggyback.supervise import terminate_on_signals

QUALITY = ("fid", "kid", "l1", "psnr", "ssim")
DO_NOTHING = tuple(f"{ref}_{s}" for ref in REFERENCES for s in SCORES)   # identity_l1, mean_target_l1, ...
# Quality and size first: the columns a reader looks for (MLflow's table view and `dvc exp show` cut the rest).
COLUMNS = (
    "name", "l1", "psnr", "ssim", "fid", "kid", "kid_std", "stored_params", "new_params", "separate_params",
    "stored_vs_separate", *DO_NOTHING, "dataset", "mode", "direction",
    "forgetting_max_abs_diff", "forgetting_exact", "final_l1", "forgetting_l1", "mlflow_run_id",
)
# metrics/per_task.json (summary key -> short name: `dvc exp show` columns read t1.l1, t1.stored, ...).
PER_TASK = {"l1": "l1", "psnr": "psnr", "ssim": "ssim", "fid": "fid", "kid": "kid", "stored_params": "stored",
            "new_params": "new", **{k: k for k in DO_NOTHING}}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _finite(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def _task_records(meta: dict) -> dict[str, dict]:
    return {t["name"]: t for t in meta.get("tasks", [])}


class _Imported:
    """A task that came with model.init_from: its dataset, mode and direction as its record says."""

    def __init__(self, record: dict):
        self.dataset = record.get("dataset") or "pretrained"
        self.mode, self.direction = record.get("mode"), record.get("direction", "AtoB")


def build_summary(params: Params, metrics_dir: Path, models_dir: Path) -> dict:
    """Collect one row per task from the stage outputs. Missing values are null with a reason beside."""
    order = params.task_order()
    if not order:
        raise ValueError("params.yaml: `tasks` is empty; nothing to report")
    meta_path = models_dir / order[-1] / "meta.json"
    meta = _read_json(meta_path)
    if meta is None:
        raise FileNotFoundError(f"{meta_path} not found: run `dvc repro train@{order[-1]}` first")
    records = _task_records(meta)
    forgetting = (read_record(metrics_dir, "forgetting.json") or {}).get("tasks", {})
    rows = []
    imported = [r["name"] for r in meta.get("tasks", []) if r["name"] not in params.tasks]  # model.init_from
    for name in imported + order:
        task = params.tasks.get(name) or _Imported(records[name])
        ev = read_record(metrics_dir, f"tasks/{name}.json") or {}
        if name in imported:
            ev = {"fid_reason": "imported by model.init_from: not trained or evaluated by this pipeline",
                  "gt_reason": "imported by model.init_from: not trained or evaluated by this pipeline"}
        tr = read_record(metrics_dir, f"train/{name}.json") or {}
        rec = records.get(name)
        if rec is None:
            raise ValueError(f"{meta_path}: task {name!r} is missing from the final checkpoint")
        fg = forgetting.get(name, {})
        row: dict[str, Any] = {
            "name": name, "dataset": task.dataset, "mode": task.mode, "direction": task.direction,
            "imported": name in imported,
        }
        for key in QUALITY + ("kid_std",):
            row[key] = _finite(ev.get(key))
        for key in QUALITY:
            if row[key] is None:
                row[f"{key}_reason"] = ev.get(f"{key}_reason") or ev.get("fid_reason" if key in ("fid", "kid") else "gt_reason") \
                    or ("evaluation missing" if not ev else "not reported")
        row.update({key: _finite(ev.get(key)) for key in DO_NOTHING})
        for key in ("new_params", "stored_params", "separate_params"):
            row[key] = rec.get(key)
        sep = row["separate_params"]
        row["stored_vs_separate"] = round(row["stored_params"] / sep, 4) if sep else None
        row["forgetting_max_abs_diff"] = _finite(fg.get("max_abs_diff"))
        row["forgetting_exact"] = fg.get("exact")
        if row["forgetting_max_abs_diff"] is None:
            row["forgetting_reason"] = fg.get("reason") or "audit missing"
        # L1 of the task with the final weights: the fine-tuning baseline measures it again (the audit);
        # for tasks the audit proved bit-exact it is the L1 right after training.
        row["final_l1"] = _finite(fg.get("final_l1"))
        if row["final_l1"] is None and row["forgetting_exact"] is True:
            row["final_l1"] = row["l1"]
        row["forgetting_l1"] = (row["final_l1"] - row["l1"]) if None not in (row["final_l1"], row["l1"]) else None
        row["mlflow_run_id"] = rec.get("mlflow_run_id") or tr.get("mlflow_run_id")
        rows.append(row)
    return {
        "method": meta.get("method", params.train.method),
        "suite": suite_signature(params),
        "final_checkpoint": str(models_dir / order[-1]),
        "netG": params.model.netG, "ngf": params.model.ngf, "lam": params.model.lam,
        "lam_overrides": dict(params.model.lam_overrides),
        "tasks": rows,
    }


def suite_signature(params: Params) -> str:
    """What must be equal for two pipeline runs to be aggregated together: everything but the method and
    the seed (the two axes a comparison runs over), and the process count."""
    from piggyback.config import as_dict, task_recipe

    train = {k: v for k, v in as_dict(params.train).items() if k not in ("method", "nproc")}
    base = {k: v for k, v in as_dict(params.base).items() if k != "seed"}
    body = {"base": base, "data": as_dict(params.data), "model": as_dict(params.model),
            "train": train, "datasets": as_dict(params.datasets),
            "tasks": [as_dict(task_recipe(params, t)) for t in params.task_order()]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _lambda_text(summary: dict) -> str:
    """What the method stores per task: the baselines ignore model.lam."""
    if summary["method"] == "separate":
        return "lambda 1 everywhere: a full generator per task"
    if summary["method"] == "finetune":
        return "one generator re-trained by every task"
    over = {k: v for k, v in (summary.get("lam_overrides") or {}).items() if v is not None}   # null: model.lam
    return f"lambda {summary['lam']}" + (f" ({', '.join(f'{k} {v}' for k, v in over.items())})" if over else "")


def to_markdown(summary: dict) -> str:
    head = ["task", "dataset", "mode", "FID", "KID", "L1", "PSNR", "SSIM", "new params",
            "stored params", "separate models", "stored/separate", "forgetting (max abs diff)"]
    lines = [
        f"# Piggyback GAN summary ({summary['method']}, {summary['netG']}, ngf {summary['ngf']}, {_lambda_text(summary)})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in summary["tasks"]:
        cells = [r["name"], r["dataset"], r["mode"], r["fid"], r["kid"], r["l1"], r["psnr"], r["ssim"],
                 r["new_params"], r["stored_params"], r["separate_params"], r["stored_vs_separate"],
                 r["forgetting_max_abs_diff"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    reasons = sorted({f"{k[:-7]}: {v}" for r in summary["tasks"] for k, v in r.items() if k.endswith("_reason")})
    if reasons:
        lines += ["", "n/a means unavailable:"] + [f"- {r}" for r in reasons]
    reference = reference_markdown(summary["tasks"], _fmt)
    if reference:
        lines += ["", reference.rstrip("\n")]
    lines += ["", "L1 is the mean absolute error on [0, 1] against the true target image; PSNR in dB; "
              "stored params count conv weights and biases of every task kept (norm parameters excluded)."]
    if len(summary.get("comparison", {}).get("methods", [])) > 1:
        from piggyback.compare import comparison_markdown

        lines += ["", comparison_markdown(summary["comparison"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())


def _plots(summary: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["tasks"]
    names = [r["name"] for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(names, [r["stored_params"] / 1e6 for r in rows], "o-", label=f"stored by this run ({summary['method']})")
    ax.plot(names, [r["separate_params"] / 1e6 for r in rows], "s--", label="one separate model per task")
    ax.set_xlabel("after task")
    ax.set_ylabel("stored parameters (M)")
    ax.set_title("Parameter growth")
    ax.set_ylim(bottom=0)   # growth read against zero, not against the first task
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "growth.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    metrics = [m for m in ("l1", "psnr", "ssim", "fid") if any(r[m] is not None for r in rows)]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(3.4 * max(len(metrics), 1), 3.4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, m in zip(axes, metrics):
        ax.bar(names, [r[m] if r[m] is not None else 0.0 for r in rows], color="#4c72b0", label="model")
        same = [r.get(f"identity_{m}") for r in rows]
        if any(v is not None for v in same):
            ax.scatter(names, [v if v is not None else float("nan") for v in same], marker="_", s=300,
                       color="#dd8452", zorder=3, label="input unchanged")
            ax.legend(fontsize=7)
        ax.set_title(m.upper() + (" (lower is better)" if m in ("l1", "fid") else " (higher is better)"))
    if not metrics:
        axes[0].text(0.5, 0.5, "no quality metric available", ha="center")
    fig.suptitle("Quality per task")
    fig.tight_layout()
    paths.append(out_dir / "quality.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    if "comparison" in summary:
        from piggyback.compare import comparison_plot

        paths.append(comparison_plot(plt, summary["comparison"], out_dir / "comparison.png"))
    return paths


def write_report(summary: dict, metrics_dir: Path) -> list[Path]:
    """summary.json (with names: a plain out) / per_task.json (numbers: the DVC metrics) / summary.md /
    growth.csv / quality.csv / growth.png / quality.png in metrics_dir."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics_dir / "summary.json", summary)
    atomic_write_json(metrics_dir / "per_task.json", per_task_metrics(summary))
    atomic_write_text(metrics_dir / "summary.md", to_markdown(summary))
    rows = [{"task": i, **r} for i, r in enumerate(summary["tasks"], 1)]   # x axis of the DVC plots
    _write_csv(metrics_dir / "growth.csv", rows, ["task", "name", "new_params", "stored_params", "separate_params"])
    _write_csv(metrics_dir / "quality.csv", rows, ["task", "name", "fid", "kid", "l1", "psnr", "ssim",
                                                  "identity_l1", "identity_psnr", "identity_ssim"])
    return [metrics_dir / n for n in ("summary.json", "per_task.json", "summary.md", "growth.csv", "quality.csv")] \
        + _plots(summary, metrics_dir)


def per_task_metrics(summary: dict) -> dict:
    """metrics/per_task.json, what `dvc exp show` lists: numbers only, keyed by task (``t1.l1``, ...)."""
    return {r["name"]: numbers_only({short: r.get(k) for k, short in PER_TASK.items()}) for r in summary["tasks"]}


def sample_sheet(summary: dict, translated_dir: Path, out: Path) -> Path:
    """One picture of every task's sample grid (input / translation / truth rows), labelled, -> `out`.

    Reads ``<translated_dir>/<task>/grid.png`` as the evaluate stage writes it; tasks without one are
    skipped (with none at all, the picture says so).
    """
    from PIL import Image, ImageDraw

    grids = []
    for r in summary["tasks"]:
        path = translated_dir / r["name"] / "grid.png"
        if path.is_file():
            with Image.open(path) as im:
                grids.append((r, im.convert("RGB")))
    if not grids:
        blank = Image.new("RGB", (420, 30), "white")
        ImageDraw.Draw(blank).text((6, 8), f"no sample grids in {translated_dir}", fill="black")
        with atomic_path(out) as tmp:
            blank.save(tmp, format="PNG")
        return out
    label_w, pad = 112, 6
    width = label_w + max(g.width for _, g in grids)
    sheet = Image.new("RGB", (width, sum(g.height + pad for _, g in grids) + pad), "white")
    draw, y = ImageDraw.Draw(sheet), pad
    for r, g in grids:
        sheet.paste(g, (label_w, y))
        # The grid has a truth row only where true outputs exist, i.e. where L1 could be computed.
        rows = ["rows: input,", "output, truth"] if r.get("l1") is not None else ["rows: input,", "output"]
        lines = [r["name"], f"{r['dataset']}", f"{r['mode']} {r['direction']}", f"L1 = {_fmt(r.get('l1'))}", *rows]
        for i, text in enumerate(lines):
            draw.text((6, y + 4 + 14 * i), text, fill="black")
        y += g.height + pad
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_pipeline_run(summary: dict, params: Params, files: list[Path]) -> Optional[str]:
    """One MLflow run per `dvc repro` / `dvc exp run` that reaches the report: params, per-task metrics,
    the table (log_table), plots, git commit and DVC experiment name as tags, links to the task runs."""
    from piggyback import tracking

    if not params.mlflow.enabled:
        return None
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    commit = _git_commit()
    # Named after what it is: the DVC experiment, else the commit `dvc repro` ran on.
    label = os.environ.get("DVC_EXP_NAME") or (commit[:7] if commit else "workspace")
    # A pipeline run of this experiment that a SIGKILLed report left RUNNING is closed (KILLED) first.
    tracking.close_leftover_runs(params.mlflow, 0, {"kind": "pipeline", "dvc.exp_name": exp_name})
    tracker = tracking.open_run(params.mlflow, rank=0, run_name=f"pipeline:{label}", tags={
        "kind": "pipeline", "method": summary["method"], "suite": summary["suite"], "git.commit": commit or "unknown",
        "dvc.exp_name": exp_name, "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", commit or ""),
        "tasks": ",".join(r["name"] for r in summary["tasks"]),
    })
    with terminate_on_signals(), tracking.ended(tracker):   # KILLED on SIGTERM / SIGINT, FAILED on errors
        flat = {
            "method": summary["method"], "model.netG": params.model.netG, "model.ngf": params.model.ngf,
            "model.lam": params.model.lam, "model.lam_overrides": json.dumps(params.model.lam_overrides),
            "train.epochs": params.train.epochs, "train.epochs_decay": params.train.epochs_decay,
            "train.batch_size": params.train.batch_size, "train.lr": params.train.lr,
            "train.nproc": params.train.nproc, "base.seed": params.base.seed,
        }
        flat.update({f"task.{r['name']}": f"{r['dataset']}/{r['mode']}/{r['direction']}" for r in summary["tasks"]})
        tracker.log_params(flat)
        metrics = {}
        for r in summary["tasks"]:
            for key in QUALITY + ("new_params", "stored_params", "separate_params", "forgetting_max_abs_diff", "final_l1", "forgetting_l1"):
                if _finite(r.get(key)) is not None:
                    metrics[f"{key}/{r['name']}"] = float(r[key])
        metrics.update(matrix_metrics(summary.get("matrix")))
        tracker.log_metrics(metrics)
        table = {c: [r.get(c) for r in summary["tasks"]] for c in COLUMNS}
        tracker.log_table(table, artifact_file="summary_table.json")
        for f in files:
            tracker.log_artifact(f)
        links = {f"task_run.{r['name']}": r["mlflow_run_id"] for r in summary["tasks"] if r["mlflow_run_id"]}
        tracker.set_tags(links)
        if tracker.run_id and links:
            exp_id = tracker.client.get_run(tracker.run_id).info.experiment_id
            note = "Per-task training runs:\n\n" + "\n".join(
                f"- {k.split('.', 1)[1]}: [#/experiments/{exp_id}/runs/{v}](#/experiments/{exp_id}/runs/{v})"
                for k, v in links.items())
            tracker.set_tags({"mlflow.note.content": note})
        if tracker.run_id:
            from piggyback.publish import publish_model   # the final generator as a registered MLflow model

            publish_model(params, summary, tracker.run_id)
    return tracker.run_id
