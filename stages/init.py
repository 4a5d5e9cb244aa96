"""Stage init: the lifelong model the first task starts from -> models/init/.

    python -m stages.init [--params params.yaml] [--out models/init]

Reads ``model`` (the GeneratorConfig every task shares) and ``train.method`` from params.yaml. The first
task (`prev: init`) starts from this folder, so the architecture is fixed once for the whole chain.
Without ``model.init_from`` it is the empty model; with it, a copy of that lifelong checkpoint (e.g. a
pretrained CycleGAN brought in by ``piggyback import-reference ... --out pretrained/<name>``), checked
against ``model`` and ``train.method`` first, its tasks and probes kept.
"""
from __future__ import annotations

import argparse
import sys

from pathlib import Path

from piggyback.checkpoint import CheckpointError, check_compatible, load_lifelong, load_probes, save_lifelong
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
        extra = {"model": as_dict(params.model), "seed": params.base.seed}
        if params.model.init_from:
            model, probes = _pretrained(Path(params.model.init_from), params)
            save_lifelong(model, args.out, probes=probes, extra_meta=extra)
            what = f"{', '.join(model.task_names())} from {params.model.init_from}"
        else:
            model = LifelongModel(GeneratorConfig.from_model_config(params.model), params.train.method)
            save_lifelong(model, args.out, extra_meta=extra)
            what = "empty"
    except FileExistsError as e:
        sys.exit(f"init: {e} (dvc repro deletes it before re-running; delete it yourself outside DVC)")
    except (ConfigError, ValueError) as e:   # CheckpointError is a ValueError
        sys.exit(f"init: {e}")
    print(f"init: {what} {params.model.netG} ({params.train.method}) -> {args.out}")


def _pretrained(path: Path, params) -> tuple[LifelongModel, dict]:
    """The checkpoint at model.init_from, verified and compatible with params, with its probes."""
    if not (path / "meta.json").is_file():
        raise ConfigError(f"model.init_from: {path} is not a lifelong checkpoint folder; create one with "
                          f"`piggyback import-reference latest_net_G_A.pth [--path-B latest_net_G_B.pth] "
                          f"--netG {params.model.netG} --ngf {params.model.ngf} --out {path}`")
    if Path("pretrained").resolve() not in path.resolve().parents:
        print(f"init: warning: {path} is outside pretrained/, so DVC does not see it change")
    model = load_lifelong(path)
    try:
        check_compatible(model, params.model, params.train.method)
    except CheckpointError as e:
        raise ConfigError(f"{e} (model.init_from {path})") from None
    clash = sorted(set(model.task_names()) & set(params.tasks))
    if clash:
        raise ConfigError(f"tasks.{clash[0]}: the name is taken by a task of model.init_from {path}")
    return model, load_probes(path)


if __name__ == "__main__":
    main()
