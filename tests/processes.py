"""Helpers for tests that run `srd` as a separate process and kill it, as a user's job would be."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def write_spec(tmp_path: Path, tiny_models: dict[str, str], sections: str, name: str = "killed") -> Path:
    """A spec with the tiny models and its own local Ray, plus the given YAML sections."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""
run: {{name: {name}, output_dir: {tmp_path / "runs"}}}
ray: {{num_cpus: 2, object_store_memory_mb: 256}}
models: {{teacher: {{path: {tiny_models["teacher"]}}}, student: {{path: {tiny_models["student"]}}}}}
"""
        + sections
    )
    return path


def start_job(spec: Path, *args: str, ray_address: str = "") -> subprocess.Popen:
    """`srd run` as a separate process: its own local Ray, or attached to ``ray_address``."""
    return subprocess.Popen(
        [sys.executable, "-m", "srd_ray.cli", "run", str(spec), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": ray_address},
    )


def rerun_job(spec: Path, *args: str, ray_address: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "srd_ray.cli", "run", str(spec), *args],
        capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ray_address}, timeout=600,
    )  # fmt: skip


def kill_tree(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal a process and every process under it at once: a local Ray's GCS and raylet, and Ray's
    workers, which run in sessions of their own and would otherwise outlive a process-group kill."""
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
        for member in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, sig)


def kill_job(job: subprocess.Popen) -> None:
    kill_tree(job.pid)
    job.wait()


def wait_until(condition, what: str, job: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job is not None and job.poll() is not None:
            pytest.fail(f"job ended before {what}:\n{job.stdout.read()}")
        if time.monotonic() > deadline:
            if job is not None:
                kill_job(job)
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_for_files(folder: Path, pattern: str, count: int, job: subprocess.Popen, timeout: float = 180) -> None:
    wait_until(lambda: len(list(folder.glob(pattern))) >= count, f"{count} {pattern}", job, timeout)
