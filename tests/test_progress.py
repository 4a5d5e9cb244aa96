"""Progress lines: rate, img/s and ETA; plain periodic lines off a terminal; silent off rank 0."""
import io

from piggyback import progress as P
from piggyback.progress import Progress, format_duration


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_format_duration():
    assert (format_duration(65), format_duration(3725), format_duration(-3)) == ("1:05", "1:02:05", "0:00")


def test_plain_lines_with_rate_eta_and_an_estimate(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(P.time, "perf_counter", clock)
    out = io.StringIO()   # not a terminal, as under `dvc repro` in CI
    bar = Progress("t1", total=100, initial=20, items_per_step=8, every_s=30, stream=out, estimate_after=5)
    for _ in range(5):
        clock.t += 0.5
        bar.update(1)
    # 5 steps in 2.5 s: 2 it/s, 16 img/s, 75 steps left -> 37.5 s
    assert out.getvalue() == "t1: 2.00 it/s, about 0:38 for the remaining 75 steps\n"
    clock.t += 30
    bar.update(1, G="1.234")
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("t1: 26/100 (26%) 0.18 it/s 1.5 img/s ETA ") and last.endswith(" G 1.234")
    bar.update(1)   # less than every_s later: no new line
    assert len(out.getvalue().splitlines()) == 2


def test_other_ranks_print_nothing():
    out = io.StringIO()
    bar = Progress("t1", total=10, enabled=False, every_s=0, stream=out, estimate_after=1)
    bar.say("hello")
    for _ in range(10):
        bar.update(1)
    bar.report()
    assert out.getvalue() == ""
