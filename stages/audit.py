"""Stage audit: the final checkpoint reproduces every task's recorded probe bit for bit -> metrics/forgetting.json.

    python -m stages.audit [--params params.yaml] [--models models] [--metrics metrics] [--data data/prepared]

Every task's own checkpoint files are first checked against the hashes in its meta.json (a damaged
intermediate checkpoint fails the audit too), and snapshot folders of finished tasks are removed. The
final checkpoint is models/<last task of params.yaml>; each task's own models/<task>/ names the altered
layer when a task no longer reproduces. Exits non-zero, naming task and layer, on any mismatch, except for
generators the fine-tuning baseline (train.method: finetune) re-trained by design: their drift is recorded
and earlier tasks are scored again with the final weights (reads data.crop_size and eval.batch_size /
eval.num_test, the prepared test splits and metrics/tasks/<task>.json).
"""
from __future__ import annotations

import sys
from collections import defaultdict

from piggyback.audit import audit_checkpoint
from piggyback import snapshot
from piggyback.checkpoint import CheckpointError, verify_files
from piggyback.config import ConfigError, dataset_data, load_params
from piggyback.metricsfile import info_path, write_metrics

from stages import stage_parser


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("audit", __doc__)
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        order = params.task_order()
        if not order:
            raise ConfigError("params.yaml: `tasks` is empty; nothing to audit")
        final = args.models / order[-1]
        if not (final / "meta.json").is_file():
            sys.exit(f"audit: {final} not found: run `dvc repro train@{order[-1]}` first")
        verified = 0
        for task in order:   # every task's own checkpoint, not only the final one
            if not (args.models / task / "meta.json").is_file():
                sys.exit(f"audit: {args.models / task} not found: run `dvc repro train@{task}` first")
            try:
                verified += len(verify_files(args.models / task))
            except CheckpointError as e:
                sys.exit(f"audit: the checkpoint of task {task} cannot be trusted: {e}; restore it with "
                         f"`dvc checkout train@{task}` (or re-train: `dvc repro -f train@{task}`)")
        cleared = snapshot.clear_finished(args.models)   # e.g. left behind when DVC restored a task from its run cache
        if cleared:
            print(f"audit: removed the stale snapshot folders of finished task(s) {', '.join(cleared)}", flush=True)
        sizes = defaultdict(lambda: params.data.crop_size,   # each task's test size (its dataset's crop_size)
                            {t: dataset_data(params, params.tasks[t].dataset).crop_size for t in order})
        result = audit_checkpoint(final, args.models, args.data, sizes, args.metrics,
                                  params.eval.batch_size, params.eval.num_test)
    except CheckpointError as e:
        sys.exit(f"audit: the final checkpoint cannot be trusted: {e}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"audit: {e}")
    report = {**result.report, "checkpoint_files_verified": verified}
    missing = [t for t in order if t not in report["tasks"]]
    if missing:
        sys.exit(f"audit: {final} does not hold task(s) {missing} listed in params.yaml: "
                 f"run `dvc repro train@{order[-1]}`")
    out = write_metrics(args.metrics, "forgetting.json", report)   # before failing: the sidecar names the layer
    if result.failures:
        sys.exit("audit: " + "\n       ".join(result.failures) + f"\n(details in {info_path(args.metrics, 'forgetting.json')})")
    rows = [f"{n} {'exact' if t['exact'] else 'unverified' if t['exact'] is None else 'drifted'}"
            f" (max |diff| {t['max_abs_diff'] if t['max_abs_diff'] is not None else 'n/a'})"
            for n, t in report["tasks"].items()]
    print(f"audit ({report['method']}): {'; '.join(rows)} -> {out}", flush=True)


if __name__ == "__main__":
    main()
