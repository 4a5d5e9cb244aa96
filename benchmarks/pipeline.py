"""Pipeline overhead: `dvc repro` end to end and with nothing to do, in a temporary git + DVC copy.

The copy holds the repo's tracked and untracked-but-not-ignored files (no data, models or metrics),
committed to a fresh git repository, so the run starts from scratch and touches nothing here. `tiny`
shrinks the embedded suite to seconds per stage (what ``--quick`` runs); `suite` is params.yaml as is.
Each `dvc repro` runs inside a small child process that reports the largest resident set among its
descendants (the heaviest stage process).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .core import ROOT
from .memory import measure_in_subprocess

# A tiny variant of the embedded suite (params.yaml keys; datasets keep the default kinds).
TINY = {
    "datasets": {"size": 32, "n_train": 8, "n_test": 4},
    "data": {"load_size": 36, "crop_size": 32},
    "model": {"ngf": 4, "ndf": 4, "netG": "resnet_6blocks"},
    "train": {"epochs": 1, "epochs_decay": 0, "batch_size": 4, "snapshot_every": 0, "probe_images": 2},
    "eval": {"grid_images": 2},
}


def _env(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1", TORCH_HOME=str(repo / ".torch_home"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def make_copy(dst: Path, variant: str) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith("benchmarks/results/"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    if variant == "tiny":
        path = dst / "params.yaml"
        raw = yaml.safe_load(path.read_text())
        for key, ds in raw["datasets"].items():
            if ds.get("source") == "embedded":
                ds.update(TINY["datasets"])
        for section in ("data", "model", "train", "eval"):
            raw[section].update(TINY[section])
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    elif variant != "suite":
        raise ValueError(f"pipeline variant must be tiny | suite, got {variant!r}")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", variant]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


def _repro(repo: Path, log: Path, timeout: float) -> dict:
    spec = {"kind": "exec", "cmd": ["dvc", "repro"], "cwd": str(repo), "log": str(log)}
    report = measure_in_subprocess(spec, timeout=timeout, env=_env(repo))
    text = log.read_text(errors="replace") if log.is_file() else ""
    report["stages_run"] = len(set(re.findall(r"Running stage '([^']+)'", text)))
    if report.get("returncode") != 0:
        report["log_tail"] = text[-2000:]
    return report


def pipeline_benchmark(workdir: Path, variant: str, noop_repeats: int, timeout: float = 3600) -> dict:
    repo = make_copy(workdir / f"repo_{variant}", variant)
    print(f"    dvc repro ({variant}) in {repo} ...", flush=True)
    full = _repro(repo, workdir / f"repro_{variant}.log", timeout)
    out = {"variant": variant, "overrides": TINY if variant == "tiny" else {}, "repro": full}
    if full.get("returncode") != 0:
        out["error"] = f"dvc repro failed (exit {full.get('returncode')}): see repro.log_tail"
        return out
    print(f"    dvc repro ({variant}): {full['elapsed_s']:.1f} s, {full['stages_run']} stages", flush=True)
    noop = [_repro(repo, workdir / f"noop_{variant}_{i}.log", 600) for i in range(noop_repeats)]
    times = sorted(r["elapsed_s"] for r in noop)
    out.update(noop=noop, repro_s=full["elapsed_s"], noop_repro_s=times[len(times) // 2],
               noop_stages_run=max(r["stages_run"] for r in noop), repro_peak_rss_mib=full.get("peak_child_mib"))
    print(f"    dvc repro, nothing to do: {out['noop_repro_s']:.2f} s (stages run: {out['noop_stages_run']})",
          flush=True)
    return out
