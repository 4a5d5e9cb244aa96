"""Stage matrix: every learned task scored with every later checkpoint -> metrics/matrix.json, matrix.png.

    python -m stages.matrix [--params params.yaml] [--models models] [--data data/prepared] [--metrics metrics]

R[i][j] is task j's L1 / PSNR / SSIM (G_A, ground truth) with the checkpoint written after task i, j <= i;
the diagonal comes from metrics/tasks/<task>.json and earlier tasks whose stored tensors are unchanged
(piggyback, separate) reuse their score. Reads tasks, datasets / data.crop_size (each task's test size),
eval.batch_size and eval.num_test. metrics/matrix.json holds the numbers (summaries), metrics/info/matrix.json
the whole matrix.
"""
from __future__ import annotations

import sys

from piggyback.checkpoint import CheckpointError
from piggyback.config import ConfigError, dataset_data, load_params
from piggyback.matrix import matrix_figure, task_matrix, test_split_scorer
from piggyback.metricsfile import write_metrics

from stages import stage_parser


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("matrix", __doc__)
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        order = params.task_order()
        if not order:
            raise ConfigError("params.yaml: `tasks` is empty; nothing to score")
        missing = [t for t in order if not (args.models / t / "meta.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{args.models / missing[0]} not found: run `dvc repro train@{missing[0]}` first")
        sizes = {t: dataset_data(params, params.tasks[t].dataset).crop_size for t in order}   # each task's test size
        score = test_split_scorer(args.data, sizes, params.eval.batch_size, params.eval.num_test)
        matrix = task_matrix(order, args.models, score, args.metrics)
    except CheckpointError as e:
        sys.exit(f"matrix: a checkpoint cannot be trusted: {e}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"matrix: {e}")
    out = write_metrics(args.metrics, "matrix.json", matrix)   # the full matrix in metrics/info/matrix.json
    matrix_figure([matrix], args.metrics / "matrix.png")
    s = matrix["summary"]["l1"]
    bwt = "n/a" if s["bwt"] is None else f"{s['bwt']:+.4g}"
    final = "n/a" if s["final_mean"] is None else f"{s['final_mean']:.4g}"
    print(f"matrix ({matrix['method']}): {matrix['evaluated']} scores computed, {matrix['reused']} reused; "
          f"L1 final mean {final}, backward transfer {bwt} -> {out}, "
          "matrix.png", flush=True)


if __name__ == "__main__":
    main()
