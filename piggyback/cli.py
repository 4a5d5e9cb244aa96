"""The `piggyback` console script: parameter growth, pretrained-generator import, folder translation.

Utilities around the pipeline (whose hyperparameters live in params.yaml, not in flags):
    piggyback growth --netG resnet_9blocks --ngf 64 --tasks 4 --lam 0.25 [--last-lam 1.0] [--json]
    piggyback import-reference latest_net_G.pth --netG resnet_9blocks --ngf 64 --out models/pretrained
    piggyback translate --checkpoint models/t3 --task facades --input DIR --output DIR
    piggyback check-params [params.yaml]

Every expected failure (bad flag value, unreadable input, unwritable output, missing device) exits with
status 2 and one line naming the input; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .config import GENERATORS, LAYER_GROUPS, NORMS, RANGES, ConfigError, check_range


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`piggyback: error: ...`), not the whole usage text."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ranged(cast: Callable[[str], Any], bounds: tuple) -> Callable[[str], Any]:
    """An argparse type: `cast` the text, then check it against `bounds` (a RANGES entry)."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {cast.__name__}") from None
        try:
            check_range(repr(text), value, bounds)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


_LAM = _ranged(float, RANGES["ModelConfig.lam"])


def _check_device(text: Optional[str]) -> None:
    """--device must name a device this machine has: a typo or a missing GPU is a usage error."""
    if text is None:
        return
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r}: not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {text!r}: no such CUDA device here ({torch.cuda.device_count()} available)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text!r}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {text!r}: only cpu, cuda and mps are supported")


def _check_output_dir(text: str) -> None:
    """--output must be a folder we can create or write into; checked before any work."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {text}: exists and is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--output {text}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {text}: {parent} is not writable")


def _lam_overrides(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for item in args.lam_override or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--lam-override {item!r}: expected NAME=VALUE (NAME: a layer group, "
                             f"{', '.join(LAYER_GROUPS)}, or a layer name)")
        try:
            out[name] = _LAM(value)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--lam-override {item!r}: lambda must be a number in (0, 1] ({e})") from None
    if args.last_lam is not None:
        out["last"] = args.last_lam
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netG", choices=GENERATORS, default="resnet_9blocks")
    p.add_argument("--ngf", type=_ranged(int, RANGES["ModelConfig.ngf"]), default=64,
                   help="filters of the first conv (default 64)")
    p.add_argument("--norm", choices=NORMS, default=None,
                   help="default: instance for resnet_*, batch for unet_* (junyanz)")
    p.add_argument("--input-nc", type=_ranged(int, RANGES["ModelConfig.input_nc"]), default=3)
    p.add_argument("--output-nc", type=_ranged(int, RANGES["ModelConfig.output_nc"]), default=3)
    p.add_argument("--lam", type=_LAM, default=0.25, help="unconstrained fraction per task (default 0.25)")
    p.add_argument("--last-lam", type=_LAM, default=None, help="lambda of the output layer (e.g. 1.0 for U-Net)")
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

    _check_device(args.device)
    _check_output_dir(args.output)
    translate_folder(args.checkpoint, args.task, args.input, args.output, which=args.which, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="piggyback", description="Piggyback GAN: lifelong image translation")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("growth", help="parameter growth per task, computed without training")
    _add_model_args(p)
    p.add_argument("--tasks", type=_ranged(int, (1, 1000)), default=4)
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

    p = sub.add_parser("dry-run", help="what `dvc repro` would run, also where `dvc repro --dry` crashes on "
                                       "inputs not made yet (fresh clone, new dataset or task)")
    p.add_argument("dvc_args", nargs="*", metavar="DVC_REPRO_ARG", help="passed to `dvc repro --dry` as given")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dry-run"] and not {"-h", "--help"} & set(argv[1:2]):
        from .dvcdry import dry_run   # everything after `dry-run` is DVC's (`-s train@t2`, `--downstream`, ...)

        return dry_run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:   # config, checkpoint, image, file-system errors: all name their input
        print(f"piggyback {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
