"""Atomic outputs: every file or folder appears complete or not at all.

Writers put data under a hidden ``.partial`` name in the same folder and rename it into place, so a crash
or Ctrl-C never leaves a half-written output that a rerun would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    pq.write_table(table, partial)
    os.replace(partial, path)


@contextlib.contextmanager
def directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden scratch folder that becomes ``path`` on success and vanishes on failure.

    An existing ``path`` is replaced only once the new content is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)


def remove_partials(folder: str | os.PathLike) -> None:
    """Delete leftovers of writers that died mid-write (hidden ``*.partial`` files and folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.rglob(".*.partial"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
