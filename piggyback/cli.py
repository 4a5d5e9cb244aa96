"""The `piggyback` console script: parameter growth, pretrained-generator import, folder translation.

Utilities around the pipeline (whose hyperparameters live in params.yaml, not in flags):
    piggyback growth --netG resnet_9blocks --ngf 64 --tasks 4 --lam 0.25 [--last-lam 1.0] [--json]
    piggyback import-reference latest_net_G.pth --netG resnet_9blocks --ngf 64 --out models/pretrained
    piggyback translate --checkpoint models/t3 --task facades --input DIR --output DIR
    piggyback check-params [params.yaml]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .config import GENERATORS, LAYER_GROUPS, NORMS


def _lam_overrides(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for item in args.lam_override or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--lam-override {item!r}: expected NAME=VALUE (NAME: a layer group, {', '.join(LAYER_GROUPS)}, or a layer name)")
        out[name] = float(value)
    if args.last_lam is not None:
        out["last"] = args.last_lam
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netG", choices=GENERATORS, default="resnet_9blocks")
    p.add_argument("--ngf", type=int, default=64, help="filters of the first conv (default 64)")
    p.add_argument("--norm", choices=NORMS, default=None,
                   help="default: instance for resnet_*, batch for unet_* (junyanz)")
    p.add_argument("--input-nc", type=int, default=3)
    p.add_argument("--output-nc", type=int, default=3)
    p.add_argument("--lam", type=float, default=0.25, help="unconstrained fraction per task (default 0.25)")
    p.add_argument("--last-lam", type=float, default=None, help="lambda of the output layer (e.g. 1.0 for U-Net)")
    p.add_argument("--lam-override", action="append", metavar="NAME=VALUE",
                   help=f"per-layer lambda; NAME is a layer group ({', '.join(LAYER_GROUPS)}) or a layer name (repeatable)")
    p.add_argument("--method", choices=("piggyback", "separate", "finetune"), default="piggyback")


def _growth(args: argparse.Namespace) -> int:
    from .accounting import format_table, growth_table

    rows = growth_table(args.netG, args.ngf, args.tasks, args.lam, _lam_overrides(args), args.norm,
                        args.input_nc, args.output_nc, 2 if args.cyclegan else 1, args.method,
                        args.bias_everywhere)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        gens = "G_A + G_B" if args.cyclegan else "one generator"
        print(format_table(rows, f"{args.netG}, ngf {args.ngf}, lambda {args.lam}"
                                 f"{' ' + str(_lam_overrides(args)) if _lam_overrides(args) else ''}, "
                                 f"{args.method}, {gens}; conv weights + biases"))
    return 0


def _import_reference(args: argparse.Namespace) -> int:
    from .checkpoint import save_lifelong
    from .reference import import_reference_model

    sources = {"G_A": args.path} | ({"G_B": args.path_B} if args.path_B else {})
    model = import_reference_model(
        sources, netG=args.netG, ngf=args.ngf, norm=args.norm, use_dropout=args.dropout,
        input_nc=args.input_nc, output_nc=args.output_nc, lam=args.lam, lam_overrides=_lam_overrides(args),
        method=args.method, name=args.task_name, dataset=args.dataset, direction=args.direction)
    out = save_lifelong(model, args.out, probes={model.tasks[0]["name"]: _probes(model)})
    record = model.tasks[0]
    print(f"{out}: task 1 {record['name']!r} ({record['mode']}, {', '.join(record['index'])}) imported from "
          f"{', '.join(str(s) for s in sources.values())}; {record['stored_params']:,} parameters")
    return 0


def _probes(model) -> dict:
    """Forgetting probes for an imported task: two seeded random images per generator (no test set here)."""
    import torch

    from .translate import input_multiple
    from .probes import record_probes

    side = max(64, input_multiple(model.config.netG)[1])
    gen = torch.Generator().manual_seed(0)
    record = model.tasks[0]
    inputs = {which: torch.rand(2, model.config.input_nc if which == "G_A" else model.config.output_nc, side, side,
                                generator=gen) * 2 - 1 for which in record["index"]}
    return record_probes(model, record["name"], inputs)


def _check_params(args: argparse.Namespace) -> int:
    """Validate params.yaml the way every stage will, before DVC deletes any output."""
    from .config import load_params

    params = load_params(args.path)
    order = params.task_order()
    print(f"{args.path}: valid ({len(params.datasets)} datasets; tasks {' -> '.join(order) or 'none'})")
    return 0


def _translate(args: argparse.Namespace) -> int:
    from .translate import translate_folder   # imported only when used

    translate_folder(args.checkpoint, args.task, args.input, args.output, which=args.which, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piggyback", description="Piggyback GAN: lifelong image translation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("growth", help="parameter growth per task, computed without training")
    _add_model_args(p)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--cyclegan", action="store_true", help="count G_A and G_B (doubles every count)")
    p.add_argument("--bias-everywhere", action="store_true",
                   help="count a per-task bias on every conv, as the public Piggyback code does")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per task")
    p.set_defaults(func=_growth)

    p = sub.add_parser("import-reference", help="a junyanz latest_net_G.pth as task 1 of a lifelong checkpoint")
    p.add_argument("path", help="latest_net_G.pth (pix2pix) or latest_net_G_A.pth (CycleGAN)")
    p.add_argument("--path-B", default=None, help="latest_net_G_B.pth: import a CycleGAN pair as G_A/G_B")
    _add_model_args(p)
    p.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=None,
                   help="generator built with dropout (default: detected for ResNet, on for U-Net)")
    p.add_argument("--task-name", default="pretrained")
    p.add_argument("--dataset", default=None)
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB")
    p.add_argument("--out", required=True, help="new checkpoint folder (must not exist)")
    p.set_defaults(func=_import_reference)

    p = sub.add_parser("check-params", help="validate params.yaml (`make repro` runs it before `dvc repro`)")
    p.add_argument("path", nargs="?", default="params.yaml")
    p.set_defaults(func=_check_params)

    p = sub.add_parser("translate", help="translate a folder of images with one task of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--which", choices=("G_A", "G_B"), default="G_A")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_translate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"piggyback {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
