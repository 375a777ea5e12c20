"""One live progress display per stage: how far, how fast, how long to go.

On a terminal it redraws in place (rich). Anywhere else (``ray job logs``, a file, a test) it writes a
plain line at most every ``PLAIN_EVERY_S`` seconds and one at the end, through the log, so a job's log
shows progress without flooding.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from srd_ray import console

log = logging.getLogger("srd_ray.progress")

PLAIN_EVERY_S = 10.0


class Progress:
    def __init__(self, label: str, total: float, unit: str) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0.0
        self.fields = ""
        self.started = time.perf_counter()
        self._last_line = 0.0
        stream = console.console()
        self._live = None
        if stream.isatty() and not console.verbose():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._live = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[fields]}"),
                console=Console(file=stream), transient=False,
            )  # fmt: skip
            self._live.start()
            self._task = self._live.add_task(label, total=total, rate="", fields="")

    def update(self, done: float, **fields: Any) -> None:
        self.done = done
        self.fields = ", ".join(f"{key} {_format(value)}" for key, value in fields.items())
        if self._live is not None:
            self._live.update(self._task, completed=done, rate=f"{self.rate:.1f}/s", fields=self.fields)
        elif time.perf_counter() - self._last_line >= PLAIN_EVERY_S or done >= self.total:
            self._plain_line()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
        elif self._last_line == 0.0 or self.done < self.total:
            self._plain_line()

    def _plain_line(self) -> None:
        self._last_line = time.perf_counter()
        eta = (self.total - self.done) / self.rate if self.rate > 0 else float("inf")
        share = 100 * self.done / self.total if self.total else 100.0
        log.info(
            "%s: %s/%s %s (%.0f%%), %.1f %s/s, ETA %s%s", self.label, _format(self.done), _format(self.total),
            self.unit, share, self.rate, self.unit, "-" if eta == float("inf") else f"{eta:.0f}s",
            f"; {self.fields}" if self.fields else "",
        )  # fmt: skip

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() or abs(value) >= 100 else f"{value:.4g}"
    return str(value)
