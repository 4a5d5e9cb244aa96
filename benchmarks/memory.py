"""Peak memory of one candidate, measured alone in a fresh process (``python -m benchmarks._case SPEC``).

Linux keeps a process's peak resident set (VmHWM); writing "5" to /proc/self/clear_refs resets it, so the
child builds its network, resets the mark, runs the work, and reports the peak of the work itself beside
the resident size before it. Where the reset is not available the peak is ru_maxrss (a lifetime peak,
flagged with ``hwm_reset: false``). On CUDA the child reports torch.cuda.max_memory_allocated as well.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

from .core import ROOT


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_peak() -> bool:
    """Reset the peak-RSS mark of this process (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:   # ru_maxrss is KiB on Linux, bytes on macOS
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kib / 1024


def measure_in_subprocess(spec: dict, timeout: float = 1800, env: dict | None = None, echo: bool = False) -> dict:
    """Run one case in a fresh interpreter (environment `env`, default ours); its JSON report or {"error"}.
    `echo`: pass the child's other output lines (its progress) through to ours as they come."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks._case", json.dumps(spec)]
    killed = threading.Event()
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        kept: list[str] = []
        try:
            for line in proc.stdout:
                if echo and not line.startswith("{"):
                    print(line, end="", flush=True)
                kept.append(line)
            returncode = proc.wait()
        finally:
            timer.cancel()
    if killed.is_set():
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in kept if ln.startswith("{")]
    if returncode != 0 or not lines:
        return {"error": f"exit {returncode}: {''.join(kept)[-800:]}"}
    return json.loads(lines[-1])
