"""Progress of long loops (train, embed, classify, ner, and any new command): one policy.

* stderr is a terminal: a tqdm bar, redrawn in place;
* stderr is a file or a pipe (`> log 2>&1`, nohup, CI): no bar (its carriage-return redraws fill
  a log with unreadable kilobytes), one plain line every `every` units and/or `interval` seconds
  instead (bilm-tf printed one every 100 batches). A loop that prints its own periodic lines
  (train's step lines every --log-every batches) passes neither and gets nothing more;
* `--progress` forces the bar, `--no-progress` shows nothing: the command line sets the
  process's `policy` from these flags (cli/common.py `add_progress_flags`, cli/__init__.py), and
  an explicit `enabled=` argument of a library call wins over both.

A command adopts it with `add_progress_flags(p)` in its add_<command>_flags and

    with progress_bar(len(lines), desc="predict", unit="line") as bar:
        for ...:
            bar.update(1)
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, TextIO

from tqdm import tqdm

# the command line's --progress (True) / --no-progress (False) / neither (None: ask the stream)
POLICY: ContextVar[Optional[bool]] = ContextVar("torch_elmo_progress", default=None)


@contextmanager
def policy(enabled: Optional[bool]) -> Iterator[None]:
    """Within the block, progress_bar(enabled=None) follows `enabled` (None: the stream decides)."""
    token = POLICY.set(enabled)
    try:
        yield
    finally:
        POLICY.reset(token)


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed file
        return False


def progress_mode(enabled: Optional[bool] = None, file: Optional[TextIO] = None) -> str:
    """"bar", "lines" or "off": `enabled` if given, else the policy, else whether `file`
    (default stderr) is a terminal."""
    if enabled is None:
        enabled = POLICY.get()
    if enabled is None:
        return "bar" if is_terminal(file or sys.stderr) else "lines"
    return "bar" if enabled else "off"


class ProgressLines:
    """The bar's stand-in off a terminal: update / set_postfix / write / close as tqdm's, and one
    line `desc: n/total unit (pct%) | rate | elapsed | left` when `every` units or `interval`
    seconds have passed since the last line (neither: no lines at all)."""

    def __init__(self, total: Optional[int] = None, desc: Optional[str] = None, unit: str = "it",
                 initial: int = 0, every: Optional[int] = None, interval: Optional[float] = None,
                 file: Optional[TextIO] = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.interval, self.file = every, interval, file
        self.postfix: dict = {}
        self.start = self.last_time = time.monotonic()
        self.start_n = self.last_n = initial

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if ((self.every is not None and self.n - self.last_n >= self.every)
                or (self.interval is not None and now - self.last_time >= self.interval)):
            self.report(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def write(self, msg: str) -> None:
        print(msg, flush=True)   # tqdm.write's default file: stdout

    def close(self) -> None:
        pass

    def report(self, now: float) -> None:
        self.last_time, self.last_n = now, self.n
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc + ': ' if self.desc else ''}{self.n:,}"
                 + (f"/{self.total:,} {self.unit} ({100.0 * self.n / max(self.total, 1):.0f}%)"
                    if self.total else f" {self.unit}"),
                 f"{rate:,.1f} {self.unit}/s", f"elapsed {tqdm.format_interval(elapsed)}"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"left ~{tqdm.format_interval((self.total - self.n) / rate)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        print(" | ".join(parts), file=self.file or sys.stderr, flush=True)


def progress_bar(total: Optional[int] = None, *, desc: Optional[str] = None, unit: str = "it",
                 enabled: Optional[bool] = None, initial: int = 0, every: Optional[int] = None,
                 interval: Optional[float] = 30.0, file: Optional[TextIO] = None, **tqdm_kwargs):
    """A tqdm bar on a terminal (or with enabled=True), else a ProgressLines (periodic lines, or
    silent with enabled=False); either is a context manager with update / set_postfix / write /
    close. `every` / `interval`: the line period off a terminal (both None: no lines, for a loop
    that logs its own); `tqdm_kwargs` go to the bar only."""
    mode = progress_mode(enabled, file)
    if mode == "bar":
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file or sys.stderr,
                    **tqdm_kwargs)
    if mode == "off":
        every = interval = None
    return ProgressLines(total, desc, unit, initial, every, interval, file)
