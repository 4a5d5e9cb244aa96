"""Stage `report`: the per-task summary table (quality, growth, forgetting) -> metrics/ and one MLflow run.

    python -m stages.report [--params params.yaml] [--metrics metrics] [--models models] [--translated DIR]

Writes metrics/summary.{json,md}, growth/quality CSVs (DVC plots) and PNGs, comparison.png (methods side
by side, mean ± std over seeds) and samples.png (every task's sample grid), and logs one MLflow pipeline
run with all of them and the matrix stage's metrics/matrix.{json,png} (summaries as metrics).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from piggyback.compare import compare_methods
from piggyback.config import load_params
from piggyback.metricsfile import read_record
from piggyback.report import build_summary, log_pipeline_run, sample_sheet, to_markdown, write_report
from piggyback.tracking import ui_link


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics", type=Path)
    ap.add_argument("--models", default="models", type=Path)
    ap.add_argument("--translated", default="data/translated", type=Path, help="evaluate's outputs (tests)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    print(f"report: one table of {len(params.tasks)} task(s) from metrics/ and models/, plots, and the MLflow "
          f"pipeline run (seconds) ...", flush=True)
    summary = build_summary(params, args.metrics, args.models)
    matrix = read_record(args.metrics, "matrix.json")          # the matrix stage's R[i][j]
    if matrix is not None:
        summary["matrix"] = matrix
    summary["comparison"] = compare_methods(summary, params)   # every run of this suite, by method and seed
    files = write_report(summary, args.metrics)
    files.append(sample_sheet(summary, args.translated, args.metrics / "samples.png"))
    if (args.metrics / "matrix.png").is_file():
        files.append(args.metrics / "matrix.png")
    run_id = log_pipeline_run(summary, params, files)
    print(to_markdown(summary))
    if run_id:
        print(f"MLflow pipeline run: {run_id}: run `mlflow ui`, then open {ui_link(params.mlflow, run_id)}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"report: {e}")
