"""What a run shows on the console, and where everything else goes.

The console gets srd-ray's own lines (stage starts and ends, one live progress display per stage, the
summary, errors). Once a run's inputs have passed their checks and Ray starts, everything else the
process writes (Ray's and the libraries' logs and warnings, C++ messages, download bars) goes to
``logs/srd.log`` in the run directory, with the full traceback of any failure; ``--verbose`` shows it all
on the console too, and workers' output as well. A run directory on an object store gets its log
uploaded when the command ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from srd_ray import storage
from srd_ray.storage import Location

LOG_FILE = "logs/srd.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TRACEBACK_LOGGER = "srd_ray.traceback"  # full tracebacks: the log file only


class _ConsoleLines(logging.Filter):
    """The console's records: srd-ray's own (all of them when verbose), never the full tracebacks."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == TRACEBACK_LOGGER:
            return False
        return self.verbose or record.name.startswith("srd_ray")


class RunConsole:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.stream = _console_stream()
        self.log_location: Location | None = None
        self._log_file: TextIO | None = None
        self._scratch: Path | None = None
        self._saved_stderr: int | None = None
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.INFO)
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_ConsoleLines(verbose))
        root.addHandler(handler)

    def attach_log(self, run_dir: str) -> None:
        """Start the run's log file; from here on the process's stderr goes there (unless verbose)."""
        if self._log_file is not None:
            return
        self.log_location = Location.of(run_dir) / LOG_FILE
        if self.log_location.is_local:
            path = Path(self.log_location.path)
        else:  # an object store: written locally, uploaded at the end
            self._scratch = path = Path(tempfile.mkdtemp(prefix="srd-log-")) / "srd.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in close())
        in_file = logging.StreamHandler(self._log_file)
        in_file.setFormatter(logging.Formatter(FORMAT))
        logging.getLogger().addHandler(in_file)
        if not self.verbose:
            sys.stderr.flush()
            self._saved_stderr = os.dup(2)
            os.dup2(self._log_file.fileno(), 2)

    def close(self) -> None:
        if self._saved_stderr is not None:
            sys.stderr.flush()
            os.dup2(self._saved_stderr, 2)
            os.close(self._saved_stderr)
            self._saved_stderr = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._scratch is not None and self.log_location is not None:
            storage.write_bytes(self.log_location, self._scratch.read_bytes())


def _console_stream() -> TextIO:
    """The terminal (or whatever stderr is): a copy of file descriptor 2, so our lines still reach it once
    descriptor 2 is pointed at the log file. Where stderr is not descriptor 2 (a test's capture), itself."""
    try:
        if sys.stderr.fileno() == 2:
            return os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):
        pass
    return sys.stderr


_active: RunConsole | None = None


@contextlib.contextmanager
def run_console(verbose: bool) -> Iterator[RunConsole]:
    global _active
    _active = RunConsole(verbose)
    try:
        yield _active
    finally:
        _active.close()
        _active = None


def attach_run_log(run_dir: str) -> None:
    """Called by the pipeline once a run's inputs passed their checks (so a refused run leaves nothing)."""
    if _active is not None:
        _active.attach_log(run_dir)


def console() -> TextIO:
    """Where live progress is drawn."""
    return _active.stream if _active is not None else sys.stderr


def verbose() -> bool:
    return _active is not None and _active.verbose


def adopt_library_loggers() -> None:
    """Ray sets up loggers that print to stderr themselves; route their records through ours instead
    (the log file always, the console when verbose). Call around ``ray.init``, which sets them up."""
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def log_traceback(error: BaseException) -> None:
    """The full traceback of a failure, for the log file (the console gets one line)."""
    logging.getLogger(TRACEBACK_LOGGER).error("%s: %s", type(error).__name__, error, exc_info=error)
