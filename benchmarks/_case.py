"""Child process of the memory measurements (and of the recipe timings): ``python -m benchmarks._case '<json spec>'``.

Builds one candidate, resets the peak-RSS mark, runs the work and prints one JSON line (see memory.py).
Kinds: train | infer (spec: case, candidate, device, channels_last, steps), fid_features (impl, weights,
folder, batch, device), frechet (impl, stats), exec (cmd, cwd, log: a command's own peak via its children);
and recipe (runner.recipe_in_subprocess: one full-iteration timing case in a fresh process).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def _train_or_infer_work(spec: dict, device):
    """Build the candidate and its inputs; return the work to measure (`steps` calls)."""
    from . import nets

    from piggyback.layers import _PiggybackConvNd

    _PiggybackConvNd.order = spec.get("order", "auto")
    case = nets.Case(**spec["case"])
    cl = bool(spec.get("channels_last"))
    if spec["kind"] == "train":
        net = nets.place(nets.candidate_net(case, spec["candidate"]), device, cl)
        x, y = nets.inputs(case, device, cl)
        step = nets.train_step_fn(net, x, y, device)
    else:
        net = nets.place(nets.infer_candidate(case, spec["candidate"]), device, cl)
        x, _ = nets.inputs(case, device, cl)
        step = nets.infer_fn(net, x, device)

    def work():
        for _ in range(int(spec.get("steps", 2))):
            step()

    return work


def measure(spec: dict) -> dict:
    """Build the spec's work, reset the peak mark, run it; the report (see the module docstring)."""
    kind = spec["kind"]
    report: dict = {"kind": kind}

    if kind == "recipe":                       # a timing, not a memory case: runner.recipe_in_subprocess
        from .runner import recipe_case

        return recipe_case(spec)

    if kind == "exec":                         # no torch import: the child's own peak is what counts
        start = time.perf_counter()
        with open(spec["log"], "w") as log:
            proc = subprocess.run(spec["cmd"], cwd=spec.get("cwd"), stdout=log, stderr=subprocess.STDOUT)
        report.update(returncode=proc.returncode, elapsed_s=time.perf_counter() - start,
                      peak_child_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        return report

    import gc

    import torch

    from . import memory
    from .core import configure_backend, resolve_device, synchronize

    device = resolve_device(spec.get("device", "cpu"))
    configure_backend(device, spec.get("threads"))

    if kind in ("train", "infer"):
        run = _train_or_infer_work(spec, device)
    elif kind == "fid_features":
        from piggyback import fid

        model = fid.load_fid_inception(spec["weights"], device)
        files = fid.image_files(spec["folder"])
        if spec["impl"] == "ours":
            run = lambda: fid.extract_features(files, model, spec["batch"], device, progress=False)  # noqa: E731
        else:
            import contextlib
            import io

            from pytorch_fid.fid_score import get_activations

            def run():
                with contextlib.redirect_stderr(io.StringIO()):
                    return get_activations([str(f) for f in files], model, spec["batch"], 2048, device, 0)
    elif kind == "frechet":
        import numpy as np

        with np.load(spec["stats"]) as f:
            args = (f["mu1"], f["sigma1"], f["mu2"], f["sigma2"])
        if spec["impl"] == "ours":
            from piggyback.fid import frechet_distance as fn
        else:
            from pytorch_fid.fid_score import calculate_frechet_distance as fn
        run = lambda: fn(*args)                # noqa: E731
    else:
        raise SystemExit(f"unknown case kind {kind!r}")

    gc.collect()
    report["rss_before_mib"] = memory.rss_mib()
    report["hwm_reset"] = memory.reset_peak()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    report["elapsed_s"] = time.perf_counter() - start
    report["peak_rss_mib"] = memory.peak_mib()
    if report["rss_before_mib"] is not None:
        report["peak_delta_mib"] = report["peak_rss_mib"] - report["rss_before_mib"]
    if device.type == "cuda":
        report["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


def main(argv: list[str]) -> int:
    print(json.dumps(measure(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
