"""Helpers for tests that run `srd` as a separate process and kill it, as a user's job would be."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from srd_ray.storage import Location, Place


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


def demo_data_yaml(
    demo_data: dict[str, str], max_response_tokens: int = 32, heldout: bool = True, max_rows: int | None = None
) -> str:
    """The ``data`` section for the demo split: train rows (the first ``max_rows`` of them if given) and
    (unless ``heldout`` is off) the held-out eval set."""
    eval_sets = f"  eval_sets: {{heldout: {demo_data['heldout']}}}\n" if heldout else ""
    limit = f"max_rows: {max_rows}, " if max_rows else ""
    return f"""
data:
  train: {{{limit}path: {demo_data["train"]}}}
{eval_sets}  max_response_tokens: {max_response_tokens}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _srd_run(spec: Path, args: tuple[str, ...], ray_address: str) -> dict:
    """`srd run` arguments: its own local Ray (empty ``ray_address``), or attached to ``ray_address``."""
    return {
        "args": [sys.executable, "-m", "srd_ray.cli", "run", str(spec), *args],
        "text": True,
        "env": {**os.environ, "RAY_ADDRESS": ray_address},
    }


def start_job(spec: Path, *args: str, ray_address: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        **_srd_run(spec, args, ray_address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def rerun_job(spec: Path, *args: str, ray_address: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(**_srd_run(spec, args, ray_address), capture_output=True, timeout=600)


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


# Three stages x 2 epochs on 2 gloo workers, a checkpoint every 5 steps. With the 160-row demo data:
# 4 buckets of 40; 2 workers x 4 rows -> 5, 10, 15 steps an epoch -> 10 + 20 + 30 = 60 steps.
DISTILL_3_STAGES = """
distill:
  num_workers: 2
  batch_size: 4
  log_every_steps: 1
  checkpoint_every_steps: 5
  stages:
    - {epochs: 2, kd_weight: 0.8, temperature: 1.0, lr: 1.0e-3}
    - {epochs: 2, kd_weight: 0.9, temperature: 1.5, lr: 1.0e-3}
    - {epochs: 2, kd_weight: 1.0, temperature: 2.0, lr: 1.0e-3}
"""
DISTILL_STEPS = 60
STAGE_1_STEPS = 10


def step_metrics(run_dir: Place) -> list[dict]:
    """The per-step records of distill/metrics.jsonl, on disk or on an object store (complete lines only:
    a local file may be mid-write)."""
    path = Location.of(run_dir) / "distill" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}") and '"event"' not in line]


def registered_checkpoint_stage(run_dir: Place) -> int:
    """The stage the newest checkpoint Ray Train has registered resumes at (-1: none yet). A worker's
    report is registered by the Train controller a moment later; a run stopped in between resumes from
    the checkpoint before."""
    snapshot = Location.of(run_dir) / "distill" / "ray_train" / "distill" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet, or mid-write
        return -1
    return latest.get("metrics", {}).get("stage", -1)


def in_stage_2(run_dir: Place, from_step: int = STAGE_1_STEPS + 1) -> bool:
    """Training logged ``from_step`` and Ray Train registered the checkpoint that ended stage 1, so a kill
    now resumes in stage 2."""
    return registered_checkpoint_stage(run_dir) >= 1 and any(
        r["global_step"] >= from_step for r in step_metrics(run_dir)
    )


def check_resumed_in_stage_2(run_dir: Place, killed_at: int) -> int:
    """Stage 1 ran once, only steps after a stage-2 checkpoint ran again (with the same losses), and the run
    ended with every step and the full count. Returns the step training resumed at."""
    steps = step_metrics(run_dir)
    assert sorted(r["global_step"] for r in steps if r["stage"] == 0) == list(range(1, STAGE_1_STEPS + 1))
    logged = Counter(r["global_step"] for r in steps)
    repeated = sorted(step for step, count in logged.items() if count > 1)
    assert not repeated or (min(repeated) > STAGE_1_STEPS and max(repeated) <= killed_at), repeated
    assert sorted(logged) == list(range(1, DISTILL_STEPS + 1))
    # The steps run again after the resume trained on the same rows from the same state: same losses.
    for step in repeated:
        losses = [r["loss"] for r in steps if r["global_step"] == step]
        assert max(losses) - min(losses) <= 1e-6 * abs(losses[0]), f"step {step} logged {losses}"
    checkpoints = [p for p in (Location.of(run_dir) / "distill" / "ray_train").files() if p.path.endswith(
        "training_state.pt")]  # fmt: skip
    assert len(checkpoints) <= 2, f"distill.keep_checkpoints is 2, found {len(checkpoints)} checkpoints"
    summary = json.loads((Location.of(run_dir) / "run.json").read_text())["stages"]["distill"]["summary"]
    assert summary["optimizer_steps"] == DISTILL_STEPS
    assert [stage["stage"] for stage in summary["stages"]] == [0, 1, 2]
    return min(repeated) if repeated else killed_at + 1


def assert_vllm_serves(model_dir: str | Path) -> None:
    """The folder is a checkpoint vLLM loads and generates with (skipped where vLLM is not installed)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return
    script = (
        "import os; os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING='0', VLLM_CPU_KVCACHE_SPACE='1')\n"
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM(model={str(model_dir)!r}, dtype='float32', max_model_len=256, enforce_eager=True)\n"
        "print('VLLM_OK', len(llm.generate(['Hello'], SamplingParams(max_tokens=4))[0].outputs[0].token_ids))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "VLLM_OK" in loaded.stdout, loaded.stderr[-2000:]


def object_keys(folder: Location) -> list[str]:
    """Every object below ``folder`` (on disk or an object store), relative to it."""
    return [info.path.removeprefix(folder.path + "/") for info in folder.files()]


@contextlib.contextmanager
def local_object_store(cache_dir: Path, bucket: str) -> Iterator[Location]:
    """A local S3 server (moto) with one bucket, and the AWS variables pointing this process and its children
    at it until the block ends. The server runs in its own process, as a real store would: moto's Flask app
    imported into this process trips vLLM, which inspects every loaded module's globals."""
    import boto3
    import botocore.exceptions

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    settings = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        # Models trained into the bucket are downloaded here to be loaded, not into ~/.cache.
        "SRD_CACHE_DIR": str(cache_dir),
    }  # fmt: skip
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=bucket)
                break
            except botocore.exceptions.EndpointConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield Location.of(f"s3://{bucket}")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.kill()
        server.wait()
