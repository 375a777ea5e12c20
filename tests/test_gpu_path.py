"""The GPU path on a CPU machine: a local Ray told it has GPUs (``ray.num_gpus``), every ``num_gpus_*`` at 1,
and the seam ``SRD_GPU_PATH_ON_CPU=1`` (``srd_ray.devices``): processes that Ray lent a GPU compute on the CPU,
training uses gloo. Every actor pool, placement group and Train worker that asks for GPUs is scheduled as on
a cluster, and each process checks that Ray really lent it its GPUs.

Before this existed the first GPU stage could not start (Ray Data refuses ``batch_size=None`` for actors
that ask for GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srd_ray.devices import CPU_FOR_GPUS
from tests.processes import demo_data_yaml, write_spec

GPU_EVERYWHERE = """
ray: {num_cpus: 4, num_gpus: 4, object_store_memory_mb: 256}
teacher_sft: {enabled: true, epochs: 1, lr: 1.0e-3, num_workers: 1, batch_size: 16, use_gpu: true}
reflect: {num_gpus_per_actor: 1, shard_rows: 20, generation: {max_new_tokens: 8}}
teacher_signal: {num_gpus_per_actor: 1, k: 16, shard_rows: 20}
distill:
  use_gpu: true
  num_workers: 2
  batch_size: 8
  teacher_signal: topk
  stages:
    - {steps: 2, kd_weight: 0.8, temperature: 1.0, lr: 1.0e-3}
    - {steps: 2, kd_weight: 0.9, temperature: 1.5, lr: 1.0e-3}
    - {steps: 2, kd_weight: 1.0, temperature: 2.0, lr: 1.0e-3}
# One model: each evaluated model starts a vLLM engine of its own, and one shows the GPU pool schedules.
evaluate:
  {num_gpus_per_actor: 1, models: [student_after], seeds: [10], max_examples: 8, generation: {max_new_tokens: 8}}
"""

# The second job on the same run: online teacher, FSDP over 2 GPU workers, and a generation actor with a GPU
# of its own (the third of the four).
ON_POLICY_FSDP = [
    "--stages", "distill", "--redo", "distill", "--set", "distill.teacher_signal=online",
    "--set", "distill.strategy=fsdp", "--set", "distill.loss=jsd", "--set", "distill.student_generation.mode=mixed",
    "--set", "distill.student_generation.num_gpus_per_actor=1",
]  # fmt: skip


def srd(spec: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, CPU_FOR_GPUS: "1", "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "srd_ray.cli", "run", str(spec), *args], env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip


@pytest.mark.slow
def test_the_whole_gpu_path_runs_on_a_ray_told_it_has_gpus(tmp_path, tiny_models, demo_data):
    # Half the demo rows (still 4 shards per pass): every pool is scheduled all the same, in half the time.
    spec = write_spec(tmp_path, tiny_models, demo_data_yaml(demo_data, max_rows=80) + GPU_EVERYWHERE, name="gpu")
    first = srd(spec)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "gpu"
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    assert all(record["status"] == "complete" for record in stages.values()), stages.keys()
    assert set(stages) == {"teacher_sft", "reflect", "rank", "teacher_signal", "distill", "evaluate"}
    assert stages["reflect"]["summary"]["rows"] == 80
    # The teacher pass scores the rows training uses: the kept 3 of 4 buckets and the 24 held-out rows.
    kept = sum(bucket["rows"] for bucket in stages["rank"]["summary"]["buckets"][:3])
    assert stages["teacher_signal"]["summary"]["rows"] == kept + 24
    assert stages["teacher_signal"]["summary"]["shards"] >= 4  # in 20-row shards
    assert stages["distill"]["summary"]["optimizer_steps"] == 6

    second = srd(spec, *ON_POLICY_FSDP)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    distill = json.loads((run_dir / "run.json").read_text())["stages"]["distill"]["summary"]
    steps = distill["student_generation"]["steps_by_source"]
    assert distill["optimizer_steps"] == 6 and sum(steps.values()) == 6
    assert [r["after_stage"] for r in distill["heldout_kd"]] == [-1, 0, 1, 2]  # FSDP + held-out rows


LM_EVAL_ON_A_GPU = """
import json, sys
import ray
from srd_ray.benchmarks import run_benchmarks
from srd_ray.spec import EvaluateSpec, LmEvalSpec, ModelSpec
# "local": a private Ray, never a cluster an earlier test left running on this machine (as CI had).
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
settings = LmEvalSpec(tasks=["srd_demo_mc"], include_path=sys.argv[1])
scores = run_benchmarks(EvaluateSpec(num_gpus_per_actor=1, lm_eval=settings), {"student": ModelSpec(path=sys.argv[2])},
                        sys.argv[3])
print(json.dumps(scores))
"""


@pytest.mark.slow
def test_lm_eval_runs_in_a_task_lent_a_gpu(tmp_path, tiny_models):
    """#30: the lm_eval stage's task asks Ray for evaluate's GPU and computes where the seam says (a task that
    was not lent its GPU fails under the seam); with no vLLM that lm-eval can load, the hf backend."""
    from tests.test_benchmarks import write_demo_tasks

    tasks = write_demo_tasks(tmp_path / "tasks")
    env = {**os.environ, CPU_FOR_GPUS: "1", "RAY_ADDRESS": ""}
    args = [str(tasks), tiny_models["student"], str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", LM_EVAL_ON_A_GPU, *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 <= scores["student"]["srd_demo_mc"]["acc"] <= 1
    assert json.loads((tmp_path / "out" / "student.json").read_text())["scores"] == scores["student"]
