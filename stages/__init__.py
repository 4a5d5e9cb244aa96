"""The DVC stages (`python -m stages.<name>`, see dvc.yaml)."""
from __future__ import annotations

import argparse
from pathlib import Path


def stage_parser(stage: str, doc: str) -> argparse.ArgumentParser:
    """The command line of `python -m stages.<stage>` with the roots every reading stage takes: params
    file, checkpoints, prepared data and metrics (tests point them at temporary folders)."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", default="models", type=Path, help="checkpoint root (tests)")
    ap.add_argument("--data", default="data/prepared", type=Path, help="prepared datasets root (tests)")
    ap.add_argument("--metrics", default="metrics", type=Path, help="metrics root (tests)")
    return ap
