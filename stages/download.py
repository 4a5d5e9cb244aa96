"""Stage download@<dataset>: fetch or generate one dataset into data/raw/<dataset>/.

    python -m stages.download <dataset_key> [--params params.yaml]

Reads ``datasets.<key>``, ``data`` and ``base.seed`` from params.yaml; archives are kept in data/downloads/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from piggyback.config import ConfigError, check_name, load_params
from piggyback.data.download import fetch_dataset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.download", description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="key under `datasets:` in params.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--raw-root", default="data/raw", help="where data/raw/<dataset> goes (tests)")
    ap.add_argument("--downloads", default="data/downloads", help="where archives are kept (tests)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        check_name("dataset key", args.dataset)   # before it is used in any path
        params = load_params(args.params)
        if args.dataset not in params.datasets:
            raise ConfigError(f"datasets.{args.dataset}: no such dataset in {args.params} "
                              f"(known: {', '.join(params.datasets) or 'none'})")
        info = fetch_dataset(args.dataset, params.datasets[args.dataset], params.data, seed=params.base.seed,
                             raw_root=args.raw_root, downloads_dir=args.downloads)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # config, network, archive, layout errors
        sys.exit(f"download@{args.dataset}: {e}")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"download@{args.dataset}: {args.raw_root}/{args.dataset} ready", json.dumps(info))


if __name__ == "__main__":
    main()
