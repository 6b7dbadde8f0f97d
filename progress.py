"""Progress of long jobs: a tqdm bar on a terminal; in a log (nohup, a pipe, Kaggle's saved
notebook runs), where a bar would be one endless line, a plain log line every --log-every seconds.

    for batch in progress.bar(batches, total=len(batches), desc="epoch 3"):
        ...
"""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

import distributed

log = logging.getLogger("birdclef")

LOG_EVERY_SECONDS = 30.0      # the default of --log-every


class LogLines:
    """tqdm's interface, writing "desc: done/total (rate/s, about N s left)" to the log at most every
    `every` seconds, and at the end of a loop that wrote any unless its last line already said it
    (a short loop writes nothing)."""

    def __init__(self, iterable, total: int | None, desc: str, unit: str, every: float):
        self.iterable, self.total, self.desc, self.unit, self.every = iterable, total, desc, unit, every
        self.done, self.postfix, self.lines, self.done_when_written = 0, "", 0, -1

    def __iter__(self):
        started = last = time.monotonic()
        for item in self.iterable:
            yield item
            self.done += 1
            now = time.monotonic()
            if now - last >= self.every:
                last = now
                self.write(now - started)
        if self.lines and self.done != self.done_when_written:
            self.write(time.monotonic() - started)

    def write(self, elapsed: float) -> None:
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        left = f", about {(self.total - self.done) / rate:.0f} s left" if self.total and rate > 0 else ""
        of = f"/{self.total}" if self.total else ""
        log.info("%s: %d%s %s (%.1f/s%s)%s", self.desc, self.done, of, self.unit, rate, left, self.postfix)
        self.lines, self.done_when_written = self.lines + 1, self.done

    def set_postfix(self, **values) -> None:
        self.postfix = "  " + "  ".join(f"{key} {value}" for key, value in values.items())

    def __len__(self):
        return self.total or 0


def bar(iterable, total: int | None = None, desc: str = "", unit: str = "it", every: float = LOG_EVERY_SECONDS,
        leave: bool = False):
    """`iterable` with its progress shown: a tqdm bar on a terminal, log lines every `every` seconds
    otherwise; nothing on ranks other than 0 under torchrun."""
    if not distributed.is_main_process():
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return LogLines(iterable, total, desc, unit, every)
