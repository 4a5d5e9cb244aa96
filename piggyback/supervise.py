"""Process lifetime of a training stage: no worker outlives its launcher, signals end runs cleanly.

The chain is ``dvc`` -> launcher (`python -m stages.train --nproc N <task>`) -> ``torchrun`` -> workers;
the launcher asks for SIGTERM when dvc dies.
torchrun starts its workers in a new session, so a signal to a process group never reaches them, and a
killed torchrun used to leave its worker training alone. Here every link dies with its parent:

* `die_with_parent()` (workers) asks Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)
  and starts a watchdog thread that hard-exits if the process is still alive a few seconds after its
  parent is gone (a worker blocked in a collective never runs its Python signal handler).
* `terminate_on_signals()` (a context) turns SIGTERM / SIGINT into the `Terminated` exception, so `finally`
  blocks run: the MLflow run ends KILLED and the snapshot on disk stays the resume point.
* `launch()` (the launcher) runs torchrun in its own process group with the same parent-death signal,
  forwards SIGTERM / SIGINT to it, kills the whole group when it ends, and returns its exit status.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

PR_SET_PDEATHSIG = 1
LAUNCHER_PID = "PIGGYBACK_LAUNCHER_PID"   # set by `launch` for the workers of the process it starts


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived: unwind (ending runs as KILLED) and exit. Not an `Exception`, so that
    no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Inside the block SIGTERM / SIGINT raise `Terminated` in the main thread; the old handlers after."""
    old = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    time.sleep(grace_s)          # the SIGTERM path had its chance to end the run cleanly
    os._exit(128 + signal.SIGTERM)


def _parent_of(pid: int) -> Optional[int]:
    """The parent PID of `pid` (Linux /proc), or None when unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def die_with_parent(grandparent: Optional[int] = None, grace_s: float = 2.0, poll_s: float = 0.25) -> None:
    """SIGTERM on the parent's death, and a hard exit `grace_s` later if that did not end the process.

    `grandparent` (the launcher's PID): when the parent is no longer its child, the parent died before
    this process could ask to be told (it was still starting up): exit at once.
    """
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    if (grandparent is not None and _parent_of(parent) not in (grandparent, None)) or os.getppid() != parent:
        os._exit(128 + signal.SIGTERM)
    threading.Thread(target=_watch_parent, args=(parent, grace_s, poll_s), daemon=True, name="parent-watchdog").start()


def die_with_launcher() -> None:
    """In a torchrun worker: `die_with_parent`, checked against the launcher `launch` recorded, if any."""
    pid = os.environ.get(LAUNCHER_PID)
    die_with_parent(int(pid) if pid and pid.isdigit() else None)


def _child_setup() -> None:   # runs in the child between fork and exec
    set_parent_death_signal(signal.SIGTERM)


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace_s`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _descendants_alive(launcher: int) -> list[int]:
    """PIDs of live processes started under `launch` by this launcher (their environment names it; Linux)."""
    mark, found = f"{LAUNCHER_PID}={launcher}".encode(), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0") and int(entry.name) != os.getpid():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def wait_for_workers(timeout_s: float = 10.0) -> list[int]:
    """After `launch` returned: wait until no process it started is left (the workers end themselves
    when torchrun is gone), SIGKILL any left after `timeout_s`. Returns the PIDs that had to be killed."""
    deadline = time.monotonic() + timeout_s
    while (alive := _descendants_alive(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


def launch(cmd: Sequence[str], env: Optional[dict] = None, grace_s: float = 10.0) -> int:
    """Run `cmd` (torchrun) as a child in its own process group; forward SIGTERM / SIGINT to the group;
    kill the group when it ends or this process is stopped. Returns the child's exit code (negative:
    killed by that signal)."""
    env = {**(os.environ if env is None else env), LAUNCHER_PID: str(os.getpid())}
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, preexec_fn=_child_setup)
    stopped: list[int] = []

    def forward(signum: int, frame) -> None:
        stopped.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()   # a forwarded signal does not interrupt the wait (PEP 475)
    finally:
        _kill_group(proc.pid, grace_s if stopped else 1.0)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return -stopped[0] if stopped and code != 0 else code
