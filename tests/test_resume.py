"""Kill a running job and rerun it: finished work is kept, the rest is done once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from srd_ray.data import load_source
from srd_ray.spec import load_spec


def start_job(spec: Path, *args: str) -> subprocess.Popen:
    """`srd run` in its own process group, so one signal reaches the driver and the Ray it started."""
    return subprocess.Popen(
        [sys.executable, "-m", "srd_ray.cli", "run", str(spec), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )


def wait_for_files(folder: Path, pattern: str, count: int, job: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(pattern))) < count:
        if job.poll() is not None:
            pytest.fail(f"job ended before {count} {pattern} existed:\n{job.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail(f"no {count} {pattern} after {timeout}s")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_reflect_resumes_with_exactly_the_input_ids(tmp_path, tiny_models, demo_data):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        f"""
run: {{name: killed, output_dir: {tmp_path / "runs"}}}
ray: {{num_cpus: 2, object_store_memory_mb: 256}}
models: {{teacher: {{path: {tiny_models["teacher"]}}}, student: {{path: {tiny_models["student"]}}}}}
data: {{train: {{path: {demo_data["train"]}}}, max_response_tokens: 32}}
reflect:
  engine: transformers
  shard_rows: 5
  generation: {{temperature: 1.0, max_new_tokens: 96}}
"""
    )
    spec = load_spec(spec_path)
    shards_dir = spec.run_dir / "reflect" / "shards"
    job = start_job(spec_path, "--stages", "reflect")
    wait_for_files(shards_dir, "shard-*.parquet", 3, job)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    survivors = {path.name: path.stat().st_mtime_ns for path in shards_dir.glob("shard-*.parquet")}
    total_shards = -(-160 // 5)
    assert 3 <= len(survivors) < total_shards, "the kill should land mid-stage"

    rerun = subprocess.run(
        [sys.executable, "-m", "srd_ray.cli", "run", str(spec_path), "--stages", "reflect"],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(survivors)} already done" in rerun.stderr
    # Shards finished before the kill are reused untouched; no partial files are left.
    assert {name: (shards_dir / name).stat().st_mtime_ns for name in survivors} == survivors
    assert not list(shards_dir.glob(".*"))
    scored_ids = [
        example_id
        for path in sorted(shards_dir.glob("shard-*.parquet"))
        for example_id in pq.read_table(path, columns=["example_id"])["example_id"].to_pylist()
    ]
    input_ids = load_source(spec.data.train, spec.data, label="train").table["example_id"].to_pylist()
    assert len(scored_ids) == len(set(scored_ids)) == len(input_ids)
    assert set(scored_ids) == set(input_ids)
    print(
        f"killed after {len(survivors)}/{total_shards} shards; rerun scored the other {total_shards - len(survivors)}"
    )
