"""``python -m benchmarks [--quick] [--device auto|cpu|cuda] [--only S,...] [--skip S,...] [--out PATH]``.

Prints a table and writes benchmarks/results/latest.json; see benchmarks/__init__.py for what is timed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import LATEST
from .core import resolve_device, wait_until_quiet
from .runner import SECTIONS, preset, run


def _sections(text: str) -> set[str]:
    names = {s.strip() for s in text.split(",") if s.strip()}
    unknown = names - set(SECTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[2])
    p.add_argument("--quick", action="store_true", help="a few minutes on a laptop CPU: 128x128, fewer repeats, "
                   "tiny dvc suite only")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto (cuda when available)")
    p.add_argument("--only", type=_sections, help=f"comma-separated sections to run ({','.join(SECTIONS)})")
    p.add_argument("--skip", type=_sections, default=set(), help="comma-separated sections to leave out")
    p.add_argument("--repeats", type=int, help="timed rounds for train/infer (overrides the preset)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="memory format of every candidate (auto: on for CUDA, off for CPU)")
    p.add_argument("--pipeline", choices=("none", "tiny", "suite", "both"),
                   help="which dvc repro runs to time (default: --quick tiny, full run suite)")
    p.add_argument("--order", choices=("auto", "compose", "mix_outputs"), default="auto",
                   help="forward order of the piggyback layers (auto: the cheaper per layer; compose: always "
                   "compose the weight first, the behaviour before the automatic choice)")
    p.add_argument("--out", type=Path, default=LATEST, help=f"results file (default {LATEST})")
    p.add_argument("--workdir", type=Path, help="keep temporary files here instead of a deleted temp folder")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="first wait (up to SECONDS) until other processes use < 0.25 cores")
    args = p.parse_args(argv)

    cfg = preset("quick" if args.quick else "full")
    sections = set(args.only or SECTIONS) - args.skip
    cfg.sections = tuple(s for s in SECTIONS if s in sections)
    cfg.channels_last = args.channels_last
    if args.repeats:
        cfg.train_repeats = cfg.infer_repeats = args.repeats
    if args.pipeline:
        cfg.pipeline = {"none": (), "tiny": ("tiny",), "suite": ("suite",), "both": ("tiny", "suite")}[args.pipeline]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    if args.wait_quiet > 0:
        wait_until_quiet(args.wait_quiet)
    cfg.order = args.order
    results = run(cfg, resolve_device(args.device), args.out, args.workdir)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
