"""Progress of long work: tqdm's bar on a terminal, plain periodic lines in a log file or a pipe."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LINE_EVERY_S = 5.0  # at most one line this often (and always the last one)


class ProgressLines:
    """The part of tqdm's interface the pipeline uses, printed as `desc: 120/825 step (15%), loss=2.31, ETA 0:00:41`:
    no carriage returns, so a log file reads line by line."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", stream: TextIO | None = None,
                 every_s: float = LINE_EVERY_S):
        self.total, self.n, self.start_n, self.desc, self.unit = total, initial, initial, desc, unit
        self.stream, self.every_s = stream or sys.stderr, every_s
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = time.monotonic()
        self.pending = False  # progress since the last line

    def update(self, n: int = 1) -> None:
        self.n += n
        self.pending = True
        if time.monotonic() - self.last_line >= self.every_s or self.n >= self.total:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.pending:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        done = self.n - self.start_n
        eta = timedelta(seconds=round((self.total - self.n) * (now - self.started) / done)) if done else "?"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        fields = "".join(f", {key}={value}" for key, value in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{share}{fields}, ETA {eta}", file=self.stream, flush=True)
        self.last_line, self.pending = now, False


def progress(total: int, initial: int = 0, desc: str = "", unit: str = "it", disable: bool = False) -> Any:
    """A progress reporter: tqdm when stderr is a terminal, ProgressLines otherwise, nothing when disabled."""
    if disable or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
    return ProgressLines(total, initial, desc, unit)


def with_progress(items: Iterable[T], total: int, desc: str = "", unit: str = "it", disable: bool = False) -> Iterator[T]:
    """`items`, reporting each one done (tqdm(items, ...) with `progress`'s choice of reporter)."""
    reporter = progress(total, desc=desc, unit=unit, disable=disable)
    try:
        for item in items:
            yield item
            reporter.update()
    finally:
        reporter.close()
