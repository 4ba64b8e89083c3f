"""Progress in a log file or pipe: plain lines at most every few seconds, never carriage-return bars."""

from __future__ import annotations

import io

from kdcache.progress import ProgressLines, progress, with_progress


def test_lines_carry_the_count_fields_and_eta_and_no_carriage_returns():
    out = io.StringIO()
    reporter = ProgressLines(total=4, initial=1, desc="student", unit="step", stream=out, every_s=0)
    reporter.set_postfix(loss="2.3100")
    for _ in range(3):
        reporter.update()
    reporter.close()  # nothing pending: no repeated last line
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("student: 2/4 step (50%), loss=2.3100, ETA ")
    assert lines[-1] == "student: 4/4 step (100%), loss=2.3100, ETA 0:00:00"
    assert len(lines) == 3


def test_lines_are_rate_limited_but_the_last_one_is_always_written():
    out = io.StringIO()
    reporter = ProgressLines(total=1000, desc="precompute", unit="shard", stream=out, every_s=3600)
    for _ in range(999):
        reporter.update()
    assert out.getvalue() == ""  # under the interval: silent
    reporter.close()
    assert out.getvalue().startswith("precompute: 999/1000 shard")
    reporter.update()
    assert out.getvalue().splitlines()[-1].startswith("precompute: 1000/1000 shard (100%)")


def test_off_a_terminal_the_reporter_is_plain_lines(capsys):
    assert isinstance(progress(10, desc="x"), ProgressLines)  # pytest's captured stderr is no terminal
    assert list(with_progress(iter("abc"), 3, desc="letters")) == ["a", "b", "c"]
    assert capsys.readouterr().err.splitlines()[-1].startswith("letters: 3/3 it (100%)")
