"""Stage init: the empty lifelong model (architecture and method, no task yet) -> models/init/.

    python -m stages.init [--params params.yaml] [--out models/init]

Reads ``model`` (the GeneratorConfig every task shares) and ``train.method`` from params.yaml. The first
task (`prev: init`) starts from this folder, so the architecture is fixed once for the whole chain.
"""
from __future__ import annotations

import argparse
import sys

from piggyback.checkpoint import save_lifelong
from piggyback.config import ConfigError, as_dict, load_params
from piggyback.lifelong import LifelongModel
from piggyback.networks import GeneratorConfig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.init", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/init", help="output folder (must not exist)")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        model = LifelongModel(GeneratorConfig.from_model_config(params.model), params.train.method)
        save_lifelong(model, args.out, extra_meta={"model": as_dict(params.model), "seed": params.base.seed})
    except FileExistsError as e:
        sys.exit(f"init: {e} (dvc repro deletes it before re-running; delete it yourself outside DVC)")
    except (ConfigError, ValueError) as e:
        sys.exit(f"init: {e}")
    print(f"init: empty {params.model.netG} ({params.train.method}) -> {args.out}")


if __name__ == "__main__":
    main()
