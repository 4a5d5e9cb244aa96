"""Progress off a terminal: plain periodic lines with counts, rate and ETA, and a closing line."""
import io
import re

from piggyback.progress import PlainProgress, progress_bar, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal():
    out = io.StringIO()
    bar = progress_bar(10, "translate", "img", stream=out, every_s=0.0)
    assert isinstance(bar, PlainProgress)
    with bar:
        for _ in range(5):
            bar.update(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6                                   # one per update (every_s=0), then the total
    assert re.fullmatch(r"translate: 4/10 img \(40%, [\d.]+ img/s, ETA \d+ s\)", lines[1]), lines[1]
    assert re.fullmatch(r"translate: 10 img in \d+ s \([\d.]+ img/s\)", lines[-1]), lines[-1]


def test_quiet_between_periods_and_when_disabled():
    out = io.StringIO()
    with progress_bar(100, "features", "img", stream=out, every_s=3600.0) as bar:
        bar.update(50)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]   # only the closing line
    silent = io.StringIO()
    with progress_bar(3, "x", stream=silent, enabled=False) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_and_track_counts_items():
    from tqdm.auto import tqdm

    bar = progress_bar(3, "x", stream=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    assert list(track([1, 2, 3], "items", every_s=3600.0)) == [1, 2, 3]


def test_resumed_count_rate_estimate_and_postfix(monkeypatch):
    """A resumed run counts from `initial`, measures its rate on its own steps, estimates the time left
    once after `estimate_after` updates and shows the latest `set_postfix` values (losses, img/s)."""
    from piggyback import progress as P

    clock = [100.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock[0])
    out = io.StringIO()
    bar = progress_bar(100, "t1", "it", stream=out, every_s=30.0, initial=20, estimate_after=5)
    for _ in range(5):
        clock[0] += 0.5
        bar.update(1)
    assert out.getvalue() == "t1: 2.00 it/s, about 38 s for the remaining 75 it\n"   # 5 steps in 2.5 s
    bar.set_postfix({"G": "1.234", "img/s": "16.0"})
    clock[0] += 30
    bar.update(1)
    assert out.getvalue().splitlines()[-1] == "t1: 26/100 it (26%, 0.2 it/s, ETA 6 min 41 s, G 1.234, img/s 16.0)"
    bar.write("t1: epoch 1/4")
    bar.close()
    assert out.getvalue().splitlines()[-2:] == ["t1: epoch 1/4", "t1: 6 it in 32 s (0.2 it/s)"]
