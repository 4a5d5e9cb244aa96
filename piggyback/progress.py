"""Progress a person can read, for loops that run for minutes: rate, ETA and the latest numbers.

On a terminal (stderr is a TTY) one tqdm line updates in place. Anywhere else (`dvc repro` in CI, a log
file) a plain line is printed every `every_s` seconds and at every `report()`, so a log shows signs of
life without thousands of carriage returns. Only the process given ``enabled=True`` (rank 0) prints.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    """3725 -> '1:02:05', 65 -> '1:05'."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts steps towards `total`; shows rate (it/s and, given `items_per_step`, img/s) and ETA."""

    def __init__(self, desc: str, total: int, initial: int = 0, *, items_per_step: int = 0, enabled: bool = True,
                 every_s: float = 30.0, stream: Optional[TextIO] = None, estimate_after: int = 5) -> None:
        self.desc, self.total, self.n, self.items_per_step = desc, total, initial, items_per_step
        self.every_s, self.estimate_after = every_s, estimate_after
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.tty = enabled, enabled and self.stream.isatty()
        self.t0, self.n0, self.last_line = time.perf_counter(), initial, time.perf_counter()
        self.postfix: dict[str, str] = {}
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True, file=self.stream)

    def say(self, line: str) -> None:
        """A line of its own (above the live bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def rate(self) -> float:
        """Steps per second in this process so far (resumed steps excluded)."""
        return (self.n - self.n0) / max(time.perf_counter() - self.t0, 1e-9)

    def eta(self) -> Optional[float]:
        r = self.rate()
        return (self.total - self.n) / r if r > 0 else None

    def update(self, n: int = 1, **postfix: str) -> None:
        """`n` more steps done; `postfix` (e.g. G="1.23") is shown with the next line."""
        self.n += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
        if n and self.n - self.n0 == self.estimate_after and self.n < self.total:
            self.say(f"{self.desc}: {self.rate():.2f} it/s, about {format_duration(self.eta() or 0)} "
                     f"for the remaining {self.total - self.n} steps")
        elif self.bar is None and time.perf_counter() - self.last_line >= self.every_s:
            self.report()

    def line(self) -> str:
        """'t1: 40/120 (33%) 2.10 it/s 8.4 img/s ETA 0:38 G 1.234'."""
        r, eta = self.rate(), self.eta()
        parts = [f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)", f"{r:.2f} it/s"]
        if self.items_per_step:
            parts.append(f"{r * self.items_per_step:.1f} img/s")
        parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return " ".join(parts)

    def report(self) -> None:
        """A plain progress line now (off a terminal); the live bar already shows it on one."""
        self.last_line = time.perf_counter()
        if self.enabled and self.bar is None:
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
