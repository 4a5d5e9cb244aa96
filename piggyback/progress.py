"""Progress a person can read: a live tqdm bar on a terminal, plain periodic lines elsewhere.

tqdm's own ``disable=None`` switches the bar off when stderr is not a terminal, which is exactly the
case of `dvc repro` in CI or with its output piped to a log: minutes without a sign of life. Off a
terminal this prints one line every `every_s` seconds instead (done / total, rate, ETA, the latest
`set_postfix` values), one early estimate of the time left after the first `estimate_after` updates, and
a last line with the totals, so a log shows both that the stage is alive and how long it will take.
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
                 stream: Optional[TextIO] = None, initial: int = 0, estimate_after: int = 0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.n, self.initial, self.estimate_after, self.closed = initial, initial, estimate_after, False
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.total and self.n - self.initial == self.estimate_after > 0 and self.n < self.total:
            self._line(f"{self._rate(now):.2f} {self.unit}/s, about {_duration(self._eta(now))} for the "
                       f"remaining {self.total - self.n} {self.unit}")
        elif now - self.last >= self.every_s:
            self.last = now
            self._line(self._status(now))

    def set_postfix(self, values: dict[str, Any]) -> None:
        """Values shown at the end of the next lines (tqdm's `set_postfix`)."""
        self.postfix = dict(values)

    def write(self, text: str) -> None:
        """A line of its own (tqdm's `write`)."""
        self._line(text, prefix=False)

    def _rate(self, now: float) -> float:   # in this process: resumed steps do not count
        return (self.n - self.initial) / max(now - self.t0, 1e-9)

    def _eta(self, now: float) -> float:
        rate = self._rate(now)
        return (self.total - self.n) / rate if rate > 0 else float("inf")

    def _status(self, now: float) -> str:
        rate, extra = self._rate(now), "".join(f", {k} {v}" for k, v in self.postfix.items())
        if not self.total:
            return f"{self.n} {self.unit} ({rate:.1f} {self.unit}/s{extra})"
        eta = self._eta(now)
        left = _duration(eta) if eta != float("inf") else "?"
        return (f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%, {rate:.1f} {self.unit}/s, "
                f"ETA {left}{extra})")

    def _line(self, text: str, prefix: bool = True) -> None:
        print(f"{self.desc}: {text}" if prefix else text, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            took, done = time.perf_counter() - self.t0, self.n - self.initial
            self._line(f"{done} {self.unit} in {_duration(took)} ({done / max(took, 1e-9):.1f} {self.unit}/s)")

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(PlainProgress):
    def _line(self, text: str, prefix: bool = True) -> None:
        pass


def progress_bar(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True,
                 every_s: float = PLAIN_EVERY_S, stream: Optional[TextIO] = None, initial: int = 0,
                 estimate_after: int = 0) -> Any:
    """A tqdm bar when `stream` (default stderr) is a terminal, else `PlainProgress`; silent when not `enabled`.

    `initial`: units already done (a resumed run). `estimate_after`: off a terminal, one line with the
    time left after that many updates (the bar shows it all along on a terminal).
    """
    stream = stream or sys.stderr
    if not enabled:
        return _Silent(total, desc, unit, stream=stream, initial=initial)
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, initial=initial)
    return PlainProgress(total, desc, unit, every_s, stream, initial, estimate_after)


def track(items: Iterable, desc: str, unit: str = "it", total: Optional[int] = None, enabled: bool = True,
          every_s: float = PLAIN_EVERY_S) -> Iterator:
    """Iterate `items` under `progress_bar` (one update per item)."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    with progress_bar(total, desc, unit, enabled, every_s) as bar:
        for item in items:
            yield item
            bar.update(1)
