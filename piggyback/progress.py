"""Progress a person can read: a live tqdm bar on a terminal, plain periodic lines elsewhere.

tqdm's own ``disable=None`` switches the bar off when stderr is not a terminal, which is exactly the
case of `dvc repro` in CI or with its output piped to a log: minutes without a sign of life. Off a
terminal this prints one line every `every_s` seconds instead (done / total, rate, ETA) and a last line
with the totals, so a log shows both that the stage is alive and how long it took.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

PLAIN_EVERY_S = 30.0   # Seconds between two plain progress lines.


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class PlainProgress:
    """tqdm's update / close / context-manager surface, writing a plain line every `every_s` seconds."""

    def __init__(self, total: Optional[int], desc: str, unit: str, every_s: float = PLAIN_EVERY_S,
                 stream: Optional[TextIO] = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.n, self.closed = 0, False
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(self._status(now))

    def _status(self, now: float) -> str:
        rate = self.n / max(now - self.t0, 1e-9)
        if not self.total:
            return f"{self.n} {self.unit} ({rate:.1f} {self.unit}/s)"
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        left = _duration(eta) if eta != float("inf") else "?"
        return f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%, {rate:.1f} {self.unit}/s, ETA {left})"

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            took = time.perf_counter() - self.t0
            self._line(f"{self.n} {self.unit} in {_duration(took)} ({self.n / max(took, 1e-9):.1f} {self.unit}/s)")

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(PlainProgress):
    def _line(self, text: str) -> None:
        pass


def progress_bar(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True,
                 every_s: float = PLAIN_EVERY_S, stream: Optional[TextIO] = None) -> Any:
    """A tqdm bar when `stream` (default stderr) is a terminal, else `PlainProgress`; silent when not `enabled`."""
    stream = stream or sys.stderr
    if not enabled:
        return _Silent(total, desc, unit, stream=stream)
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return PlainProgress(total, desc, unit, every_s, stream)


def track(items: Iterable, desc: str, unit: str = "it", total: Optional[int] = None, enabled: bool = True,
          every_s: float = PLAIN_EVERY_S) -> Iterator:
    """Iterate `items` under `progress_bar` (one update per item)."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    with progress_bar(total, desc, unit, enabled, every_s) as bar:
        for item in items:
            yield item
            bar.update(1)
