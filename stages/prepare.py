"""Stage prepare@<dataset>: check, convert and split data/raw/<dataset> into data/prepared/<dataset>/.

    python -m stages.prepare <dataset_key> [--params params.yaml]

Reads ``datasets.<key>.resize`` and ``data.bad_images`` from params.yaml; writes manifest.json beside the
images and prints every bad file with the reason.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from piggyback.config import ConfigError, check_name, load_params
from piggyback.data.prepare import list_images, prepare_dataset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="key under `datasets:` in params.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--raw-root", default="data/raw")
    ap.add_argument("--prepared-root", default="data/prepared")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        check_name("dataset key", args.dataset)   # before it is used in any path
        params = load_params(args.params)
        if args.dataset not in params.datasets:
            raise ConfigError(f"datasets.{args.dataset}: no such dataset in {args.params}")
        ds = params.datasets[args.dataset]
        raw = Path(args.raw_root) / args.dataset
        n = len(list_images(raw)) if raw.is_dir() else 0
        print(f"prepare@{args.dataset}: checking and converting {n} images of "
              f"{ds.path if ds.source == 'folder' else raw} (seconds per thousand) ...", flush=True)
        manifest = prepare_dataset(raw, Path(args.prepared_root) / args.dataset,
                                   dataset=args.dataset, bad_images=params.data.bad_images, resize=ds.resize,
                                   origin=ds.path if ds.source == "folder" else None)
    except (OSError, ValueError) as e:  # layout errors, bad images under "stop", empty splits
        sys.exit(f"prepare@{args.dataset}: {e}")
    for bad in manifest["bad_files"]:
        print(f"prepare@{args.dataset}: skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    print(f"prepare@{args.dataset}: {manifest['layout']} ({counts}); {len(manifest['bad_files'])} bad file(s) "
          f"skipped; {time.perf_counter() - t0:.1f} s -> {args.prepared_root}/{args.dataset}")


if __name__ == "__main__":
    main()
