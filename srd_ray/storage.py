"""Where run outputs live (a local folder or an object store) and how they are written atomically.

A ``Location`` is a path on a pyarrow filesystem: ``LocalFileSystem`` for plain paths, and for URIs
(``s3://``, ``gs://``, ``abfss://``, ``hdfs://``, ``file://``) whatever ``pyarrow.fs.FileSystem.from_uri``
makes of them. Credentials and endpoints come from the environment each node already has
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``), so the
URIs written into specs, logs and ``run.json`` carry no secrets.

Every file appears complete or not at all:

- local files are written under a hidden ``.partial`` name in the same folder and renamed into place;
- an object is uploaded from a complete in-memory buffer, because an object store has no rename and an
  upload closed after an error would publish the half written so far; an upload that dies midway is
  never completed, so it leaves nothing;
- folders are built in a local scratch folder; a local one is renamed into place, an object-store one is
  uploaded file by file, and the stage record in ``run.json`` (written after) is what marks it complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Union

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# What functions that write or read run outputs accept: a Location, a local path or a URI.
Place = Union["Location", str, os.PathLike]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def absolute_path(text: str) -> str:
    """``text`` made absolute and normalised, symlinks kept: a mount reached through a link on the driver
    (``/mnt/fsx -> /fsx``) stays the path every node uses, not the link's target there (review F19)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(text)))


def is_uri(text: str) -> bool:
    return bool(_URI.match(text))


@dataclass(frozen=True)
class Location:
    """A file or folder on a local disk or an object store. Picklable, so Ray tasks can take one."""

    filesystem: pafs.FileSystem
    path: str  # in the filesystem's own terms: absolute for local disks, "bucket/key" for S3
    scheme: str = ""  # "" for local paths

    @classmethod
    def of(cls, place: Place) -> Location:
        if isinstance(place, Location):
            return place
        text = str(place)
        if not is_uri(text):
            return cls(pafs.LocalFileSystem(), absolute_path(text))
        filesystem, path = pafs.FileSystem.from_uri(text)
        if isinstance(filesystem, pafs.LocalFileSystem):  # file:// URIs are local paths
            return cls(filesystem, path)
        return cls(filesystem, path.rstrip("/"), text.split("://", 1)[0])

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def __truediv__(self, name: str) -> Location:
        return Location(self.filesystem, f"{self.path.rstrip('/')}/{name}", self.scheme)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.filesystem, self.path.rstrip("/").rsplit("/", 1)[0], self.scheme)

    @property
    def is_local(self) -> bool:
        return not self.scheme

    def kind(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    def exists(self) -> bool:
        return self.kind() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.kind() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File

    def children(self) -> list[Location]:
        """Files and folders directly inside, sorted by name; hidden (``.``) entries left out."""
        found = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        children = [Location(self.filesystem, info.path, self.scheme) for info in found]
        return sorted((c for c in children if not c.name.startswith(".")), key=lambda c: c.name)

    def files(self) -> list[pafs.FileInfo]:
        """Every file below, recursively (for fingerprints and downloads)."""
        found = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return sorted((info for info in found if info.type == pafs.FileType.File), key=lambda info: info.path)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_binary(self) -> IO[bytes]:
        """A file object for reading bytes line by line: streamed from disk, fetched whole from a store."""
        if self.is_local:
            return open(self.path, "rb")
        return io.BytesIO(self.read_bytes())

    def read_parquet(self, **options: Any) -> pa.Table:
        return pq.read_table(self.path, filesystem=self.filesystem, **options)

    def parquet_file(self) -> pq.ParquetFile:
        return pq.ParquetFile(self.filesystem.open_input_file(self.path))


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def _partial_file(path: Path) -> Iterator[Any]:
    """A local file that appears at ``path`` only once it is whole: written as a partial file, renamed into
    place, and removed if writing fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    try:
        with open(partial, "wb") as stream:
            yield stream
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_bytes(place: Place, data: bytes | pa.Buffer) -> None:
    location = Location.of(place)
    if location.is_local:
        with _partial_file(Path(location.path)) as stream:
            stream.write(data)
        return
    with location.filesystem.open_output_stream(location.path) as stream:
        stream.write(data)


def write_text(place: Place, text: str) -> None:
    write_bytes(place, text.encode("utf-8"))


def write_json(place: Place, payload: Any) -> None:
    write_text(place, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet(place: Place, table: pa.Table, row_group_size: int | None = None) -> None:
    """``table`` as one Parquet file, atomically; ``row_group_size`` rows a group where readers need
    row groups they can read alone (training rows, teacher signal shards)."""
    location = Location.of(place)
    if location.is_local:  # streamed: building the file in memory first cost the driver its size twice
        with _partial_file(Path(location.path)) as stream:
            pq.write_table(table, stream, row_group_size=row_group_size)
        return
    # An object store shows an object when its stream closes, also after a failed write: write it whole
    # (the Arrow buffer itself: a Python bytes copy would cost the file's size again).
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    write_bytes(location, buffer.getvalue())


def append_line(place: Place, line: str) -> None:
    """Add one line to a log file. Objects cannot be appended to: they are rewritten whole (logs are small)."""
    location = Location.of(place)
    if location.is_local:
        Path(location.path).parent.mkdir(parents=True, exist_ok=True)
        with open(location.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        return
    existing = location.read_text() if location.is_file() else ""
    write_text(location, existing + line + "\n")


def delete(place: Place) -> None:
    """Remove a file or a whole folder, if it exists."""
    location = Location.of(place)
    kind = location.kind()
    if kind == pafs.FileType.Directory:
        location.filesystem.delete_dir(location.path)
    elif kind == pafs.FileType.File:
        location.filesystem.delete_file(location.path)


@contextlib.contextmanager
def directory(place: Place) -> Iterator[Path]:
    """Yield a local scratch folder that becomes ``place`` on success and vanishes on failure.

    An existing folder at ``place`` is replaced only once the new content is complete."""
    location = Location.of(place)
    if location.is_local:
        path = Path(location.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = _partial_name(path)
        scratch.mkdir()
    else:
        scratch = Path(tempfile.mkdtemp(prefix="srd-upload-"))
    try:
        yield scratch
        if location.is_local:
            swap_in(scratch, path)
        else:
            delete(location)
            pafs.copy_files(str(scratch), location.path, pafs.LocalFileSystem(), location.filesystem)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def swap_in(new: Path, path: Path) -> None:
    """Move the folder ``new`` to ``path``, replacing what is there. The old folder is renamed aside, not
    deleted, until the new one is in place, and renamed back if that fails: ``path`` is without a folder
    for the moment between two renames, not for a whole deletion (review C3)."""
    old = _partial_name(path.with_name(path.name + ".old")) if path.exists() else None
    if old is not None:
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_partials(place: Place) -> None:
    """Delete leftovers of local writers that died mid-write (hidden ``*.partial`` files and folders).

    Object stores have none: an upload that never completed leaves no object."""
    location = Location.of(place)
    if not location.is_local or not Path(location.path).is_dir():
        return
    for leftover in Path(location.path).rglob(".*.partial"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def local_copy(place: Place) -> Path:
    """A local folder with the contents of ``place`` (for loaders that read local files only, like
    ``from_pretrained`` and vLLM). Local folders are used as they are; an object-store folder is
    downloaded once per node (see :func:`cached_folder`), keyed by its URI and its files' names, sizes and
    modification times, so a rewritten folder is fetched again."""
    location = Location.of(place)
    if location.is_local:
        return Path(location.path)
    files = location.files()
    if not files:
        raise FileNotFoundError(f"{location} holds no files")
    identity = [str(location)] + [f"{info.path}:{info.size}:{info.mtime_ns}" for info in files]

    def download(scratch: Path) -> None:
        pafs.copy_files(location.path, str(scratch), location.filesystem, pafs.LocalFileSystem())

    return cached_folder("downloads", location.name, identity, download)


def file_identity(folder: str | os.PathLike) -> list[str]:
    """Names, sizes and modification times of a local folder's files: what tells a rewritten folder."""
    return [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(Path(folder).rglob("*")) if p.is_file()]


def cached_folder(kind: str, name: str, identity: list[str], build: Callable[[Path], None]) -> Path:
    """``$SRD_CACHE_DIR/<kind>/<name>-<hash of identity>``, built once per node by ``build(scratch)``.

    The folder appears whole (built under a hidden name, then renamed). Workers on one node that need it at
    once (eight GPU workers merging a 7B teacher's adapter, eight downloads of one model) take turns on a
    lock file beside it: the first builds, the others wait and then use its folder (review F11)."""
    import fcntl

    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    target = cache_dir() / kind / f"{name}-{key}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if target.exists():
            return target
        scratch = _partial_name(target)
        scratch.mkdir()
        try:
            build(scratch)
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def cache_dir() -> Path:
    """This node's cache: ``$SRD_CACHE_DIR``, by default ``~/.cache/srd-ray``."""
    return Path(os.environ.get("SRD_CACHE_DIR", "~/.cache/srd-ray")).expanduser()
