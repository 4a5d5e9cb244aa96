"""Shared machinery: device setup, interleaved timing, environment record, atomic JSON output."""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from piggyback.fsutil import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


# -- device --------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be auto | cpu | cuda, got {name!r}")
    return torch.device(name)


def configure_backend(device: torch.device, threads: int | None = None) -> dict:
    """The fastest generic settings for plain PyTorch on `device`, applied to every candidate alike.

    CPU: one intra-op thread per available core (oneDNN convolutions are on by default), or `threads`.
    CUDA: cuDNN autotuning, TF32 matmuls for the float32 parts; bf16 autocast and channels_last are
    applied per case.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or cores)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return {"threads": torch.get_num_threads(), "cores": cores}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing --------------------------------------------------------------------------------------
def interleave(candidates: Mapping[str, Callable[[], object]], warmup: int, repeats: int,
               device: torch.device, label: str = "", verbose: bool = True,
               track_cuda_memory: bool = False) -> dict:
    """Time each candidate `repeats` times, round-robin, after `warmup` untimed rounds.

    Rounds alternate the order (A B C, C B A, ...) so slow drifts of the machine fall on every
    candidate alike. Returns per candidate: median_s, min_s, mean_s, samples_s, repeats (and on CUDA
    with `track_cuda_memory`, the max memory allocated during its calls, in MiB).
    """
    names = list(candidates)
    cuda_peak = {n: 0 for n in names}

    def call(name: str) -> float:
        if track_cuda_memory:
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        candidates[name]()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if track_cuda_memory:
            cuda_peak[name] = max(cuda_peak[name], torch.cuda.max_memory_allocated(device))
        return elapsed

    for _ in range(warmup):
        for name in names:
            call(name)
    samples = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(call(name))
        if verbose:
            now = "  ".join(f"{n} {samples[n][-1] * 1e3:.0f} ms" for n in names)
            print(f"    {label} round {r + 1}/{repeats}: {now}", flush=True)
    out = {}
    for name in names:
        s = samples[name]
        out[name] = {"median_s": statistics.median(s), "min_s": min(s), "mean_s": statistics.fmean(s),
                     "samples_s": s, "repeats": len(s), "warmup": warmup}
        if track_cuda_memory:
            out[name]["cuda_max_allocated_mib"] = cuda_peak[name] / 2**20
    return out


def ratios(timings: Mapping[str, dict], baseline: str) -> dict:
    """Per candidate: median / baseline median, and the median of the round-by-round ratios."""
    base = timings[baseline]
    out = {}
    for name, t in timings.items():
        if name == baseline:
            continue
        paired = [a / b for a, b in zip(t["samples_s"], base["samples_s"])]
        out[name] = {"ratio": t["median_s"] / base["median_s"], "paired_ratio": statistics.median(paired),
                     "min_ratio": t["min_s"] / base["min_s"]}
    return out


class OtherLoad:
    """CPU time other processes used while a block ran, in cores (Linux /proc/stat; None elsewhere).

    Busy CPU time of the whole machine minus this process's own (and its waited-for children's), over the
    wall time: 0 on a quiet machine, about 1 when another process kept one core busy throughout. Timings
    taken while it is well above 0 are contaminated, ratios less so (the candidates are interleaved).
    """

    @staticmethod
    def _machine_busy() -> float | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def __enter__(self) -> "OtherLoad":
        self.start = (time.perf_counter(), self._machine_busy(), self._own())
        self.cores = None
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = time.perf_counter(), self._machine_busy(), self._own()
        if busy is None or self.start[1] is None or wall <= self.start[0]:
            return
        other = (busy - self.start[1]) - (own - self.start[2])
        self.cores = max(0.0, other / (wall - self.start[0]))


# -- environment ---------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == field:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_generation() -> str:
    """What tells CPUs of one marketing name apart (a virtual "AMD EPYC" may be Zen 3 or Zen 4, and the
    kernels' ratios differ between them): the vector instruction set PyTorch dispatches to, and the
    family/model numbers where /proc/cpuinfo has them, e.g. "AVX2, family 25 model 1"."""
    isa = torch.backends.cpu.get_cpu_capability()
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    return f"{isa}, family {family} model {model}" if family and model else isa


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device, backend: dict) -> dict:
    import numpy
    import scipy

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_name": cpu_name(),
        "cpu_generation": cpu_generation(),
        "cpu_count": os.cpu_count(),
        "threads": backend["threads"],
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_start": load_average(),
    }
    try:
        import pytorch_fid

        env["pytorch_fid"] = getattr(pytorch_fid, "__version__", "unknown")
    except ImportError:
        env["pytorch_fid"] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


# -- output --------------------------------------------------------------------------------------
def _finite(obj):
    """JSON cannot hold NaN/inf: replace them by None (and say so by the value's absence)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, data: dict) -> None:
    """Write atomically (the library's writer), NaN/inf as null."""
    atomic_write_json(path, _finite(data))


def fmt_table(head: list[str], rows: Iterable[list[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def wait_until_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 5.0) -> float | None:
    """Sleep until other processes use less than `threshold` cores over a `window_s` window, or give up
    after `max_wait_s`; returns the last measured load of the others (None where it cannot be measured)."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        with OtherLoad() as other:
            time.sleep(window_s)
        if other.cores is None or other.cores < threshold or time.perf_counter() >= deadline:
            return other.cores
        print(f"waiting for a quiet machine: other processes use {other.cores:.2f} cores", flush=True)
