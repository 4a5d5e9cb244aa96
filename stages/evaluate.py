"""Stage evaluate@<task>: translate the task's test split and score it -> metrics/tasks/<task>.json.

    python -m stages.evaluate <task> [--params params.yaml] [--models models] [--data data/prepared]
        [--metrics metrics] [--out data/translated] [--fid-cache DIR]

Reads ``eval``, ``data.crop_size``, ``tasks.<task>`` and ``mlflow`` from params.yaml; the path flags exist
for tests. Writes data/translated/<task>/ (fake_B/, real_B/, grid.png; fake_A/, real_A/, grid_reverse.png
for CycleGAN tasks) and metrics/tasks/<task>.json (numbers; the full record in metrics/info/tasks/), and
logs them into an MLflow run `evaluate:<task>` nested under the task's training run. Real-image Inception
features are cached in data/fid_cache/ under the repository root ($DVC_ROOT), not a DVC output. Without the FID Inception weights FID / KID are null with the reason
(the stage fails instead when eval.require_fid is set).
"""
from __future__ import annotations

import sys
from pathlib import Path

from piggyback.checkpoint import CheckpointError
from piggyback.config import ConfigError, load_params, task_recipe
from piggyback.evaluation import evaluate_task
from piggyback.metricsfile import write_metrics
from piggyback.scoring import FidUnavailableError
from piggyback.tracking import log_evaluation, repo_root

from stages import stage_parser


class StageError(RuntimeError):
    """A missing input; the message names it and the DVC stage that makes it."""


def _fmt(metrics: dict, key: str) -> str:
    v = metrics.get(key)
    return "n/a" if v is None else f"{v:.4g}"


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("evaluate", __doc__)
    ap.add_argument("task", help="task id under `tasks:` in params.yaml")
    ap.add_argument("--out", default="data/translated", type=Path, help="translations root (tests)")
    ap.add_argument("--fid-cache", default=None, type=Path, help="default: <repo root>/data/fid_cache")
    args = ap.parse_args(argv)
    task = args.task
    try:
        params = load_params(args.params)
        recipe = task_recipe(params, task)
        ckpt, data = args.models / task, args.data / recipe.dataset
        if not (ckpt / "meta.json").is_file():
            raise StageError(f"{ckpt} not found: run `dvc repro train@{task}` first")
        if not data.is_dir():
            raise StageError(f"{data} not found: run `dvc repro prepare@{recipe.dataset}` first")
        print(f"evaluate@{task}: translating the test split of {recipe.dataset} ({recipe.mode} {recipe.direction}"
              f"{', both directions' if recipe.mode == 'cyclegan' else ''}), scoring L1 / PSNR / SSIM, the do-nothing "
              f"reference and FID / KID when the Inception weights are at hand (seconds to minutes) ...", flush=True)
        result = evaluate_task(params, task, ckpt, data, args.out / task,
                               args.fid_cache or repo_root() / "data" / "fid_cache")
    except (ConfigError, CheckpointError, FidUnavailableError, StageError, FileNotFoundError, ValueError) as e:
        sys.exit(f"evaluate@{task}: {e}")
    m = result.metrics
    out_json = write_metrics(args.metrics, f"tasks/{task}.json", m)   # text (reasons, hashes) in metrics/info/
    note = log_evaluation(params.mlflow, task, result.run_id, m, result.artifacts)
    fid = _fmt(m, "fid") if m["fid"] is not None else f"n/a ({m['fid_reason']})"
    print(f"evaluate@{task}: {m['n_test']} test images; FID {fid}; KID {_fmt(m, 'kid')}; L1 {_fmt(m, 'l1')}, "
          f"PSNR {_fmt(m, 'psnr')}, SSIM {_fmt(m, 'ssim')} -> {out_json}; {note}", flush=True)


if __name__ == "__main__":
    main()
