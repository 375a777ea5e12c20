"""Several nodes on one machine: a ``ray.cluster_utils.Cluster`` of a head with no CPU (it runs the driver
only, as a real head does) and two worker nodes of one CPU each, so every stage's actors and both Train
workers spread over the two nodes. ``srd run`` attaches to it as a user's job does (RAY_ADDRESS).

- The whole pipeline (teacher SFT to report) with ``teacher_signal: topk`` and its run directory on a local S3
  server (moto): killed in distill stage 2, rerun (it resumes from the S3 checkpoint), rerun again (nothing
  is redone). Nothing is written to local disk.
- A node that cannot see a local run directory stops the run before any stage, naming it.
- A stage that asks for more than the cluster has waits for nodes to join, saying so, then runs.
- Node loss (``pytest -m node_loss``, outside the default run for time; ``bench/cluster_faults.py`` measures
  every stage's): the node of a Train worker is removed after distill's first committed checkpoint and a
  fresh one joins; the run finishes, resumed from that checkpoint, every row once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from srd_ray.cli import main
from srd_ray.shared_storage import NODE_DISK
from srd_ray.storage import Location
from tests.processes import (
    DISTILL_3_STAGES,
    DISTILL_STEPS,
    check_resumed_in_stage_2,
    demo_data_yaml,
    in_stage_2,
    kill_job,
    object_keys,
    step_metrics,
    wait_until,
)

pytestmark = pytest.mark.slow

PIPELINE = """
engine: {name: transformers}
reflect: {concurrency: 2, shard_rows: 40, generation: {max_new_tokens: 8}}
teacher_signal: {concurrency: 2, k: 8, shard_rows: 40}
distill:
  teacher_signal: topk
  num_workers: 2
  batch_size: 8
  log_every_steps: 2
  stages:
    - {steps: 2, kd_weight: 0.8, temperature: 1.0, lr: 1.0e-3}
    - {steps: 2, kd_weight: 0.9, temperature: 1.5, lr: 1.0e-3}
    - {steps: 2, kd_weight: 1.0, temperature: 2.0, lr: 1.0e-3}
evaluate: {seeds: [10], max_examples: 8, generation: {max_new_tokens: 8}}
"""


@pytest.fixture(scope="module")
def cluster(object_store):
    """Head (0 CPU) + two 1-CPU worker nodes; started after the S3 server, so the nodes' workers get its
    AWS variables as nodes on a real cluster get theirs."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()


def spec_file(tmp_path: Path, tiny_models: dict, demo_data: dict, output_dir: str, name: str, extra: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    models = f"models: {{teacher: {{path: {tiny_models['teacher']}}}, student: {{path: {tiny_models['student']}}}}}\n"
    path.write_text(f"run: {{name: {name}, output_dir: {output_dir}}}\n" + models + demo_data_yaml(demo_data) + extra)
    return path


def srd_command(cluster, spec: Path, *args: str) -> dict:
    return {"args": [sys.executable, "-m", "srd_ray.cli", "run", str(spec), *args],
            "env": {**os.environ, "RAY_ADDRESS": cluster.address}}  # fmt: skip


def srd_run(cluster, spec: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(**srd_command(cluster, spec, *args), capture_output=True, text=True, timeout=timeout)


# Teacher SFT, then the top-k signal of the fine-tuned teacher; 60 distill steps on 2 workers (one a node).
ON_AN_OBJECT_STORE = (
    PIPELINE.split("distill:")[0]
    + "teacher_sft: {enabled: true, epochs: 1, batch_size: 16, num_workers: 1}\n"
    + DISTILL_3_STAGES.replace("distill:\n", "distill:\n  teacher_signal: topk\n")
    + "evaluate: {models: [student_after], seeds: [10], max_examples: 8, generation: {max_new_tokens: 8}}\n"
)


def test_the_pipeline_spreads_over_two_nodes_lives_on_an_object_store_and_resumes_from_it(
    cluster, object_store, tmp_path, tiny_models, demo_data
):
    spec = spec_file(tmp_path, tiny_models, demo_data, f"s3://{object_store.path}/nodes", "nodes", ON_AN_OBJECT_STORE)
    run_dir = object_store / "nodes" / "nodes"
    job = subprocess.Popen(**srd_command(cluster, spec), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: in_stage_2(run_dir, from_step=24), "stage 2", job, timeout=900)
    kill_job(job)
    killed_at = max(r["global_step"] for r in step_metrics(run_dir))
    assert killed_at < 30, "the kill should land inside stage 2 (steps 11..30)"

    rerun = srd_run(cluster, spec)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "reflect: already complete, skipping" in rerun.stderr
    resumed_at = check_resumed_in_stage_2(run_dir, killed_at)

    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    assert [name for name, record in stages.items() if record["status"] == "complete"] == [
        "teacher_sft", "reflect", "rank", "teacher_signal", "distill", "evaluate",
    ]  # fmt: skip
    objects = object_keys(run_dir)
    assert len([k for k in objects if k.startswith("reflect/shards/shard-")]) == 4
    assert {"rank/manifest.json", *(f"rank/bucket={b}/part-00000.parquet" for b in range(4))} <= set(objects)
    for model in ("teacher_sft/model", "distill/model"):
        assert {f"{model}/config.json", f"{model}/model.safetensors", f"{model}/tokenizer.json"} <= set(objects)
    assert any(k.startswith("distill/ray_train/") and k.endswith("training_state.pt") for k in objects)
    assert {"evaluate/student_after/summary.json", "evaluate/student_after/predictions.parquet"} <= set(objects)
    ids = [i for k in objects if k.startswith("reflect/shards/shard-")
           for i in (run_dir / k).read_parquet(columns=["example_id"])["example_id"].to_pylist()]  # fmt: skip
    assert len(ids) == len(set(ids)) == 160, "every row scored exactly once"
    assert stages["teacher_signal"]["summary"]["rows"] == 144  # 3 kept buckets of 40 + 24 held-out rows
    assert stages["distill"]["summary"]["optimizer_steps"] == DISTILL_STEPS
    assert stages["distill"]["summary"]["model"] == f"s3://{object_store.path}/nodes/nodes/distill/model"
    heldout = {r["after_stage"]: r["heldout_kd"] for r in stages["distill"]["summary"]["heldout_kd"]}
    assert sorted(heldout) == [-1, 0, 1, 2], "held-out KD before training and after every stage, resumed or not"
    metrics = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    for workers in [m["nodes"] for m in metrics if m.get("event") == "workers"]:
        assert len(workers) == 2 and len(set(workers)) == 2, "the two Train workers ran on different nodes"
    assert not (tmp_path / "runs").exists(), "no run output on local disk"

    again = srd_run(cluster, spec)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already complete, skipping") == 6
    assert json.loads((run_dir / "run.json").read_text())["stages"] == stages
    assert main(["report", str(run_dir)]) == 0
    assert {"report/report.html", "report/loss.png", "report/signals.png"} <= set(object_keys(run_dir))
    print(f"on s3 over 2 nodes: {len(objects)} objects; killed at step {killed_at}, resumed at step {resumed_at}")


def test_a_node_that_cannot_see_a_local_run_directory_stops_the_run(cluster, tmp_path, tiny_models, demo_data):
    """Review F3: the seam gives the third node a disk of its own; the run stops before any stage."""
    blind = cluster.add_node(num_cpus=1, env_vars={NODE_DISK: str(tmp_path / "other-disk")})
    cluster.wait_for_nodes()
    try:
        spec = spec_file(tmp_path, tiny_models, demo_data, str(tmp_path / "runs"), "blind", PIPELINE)
        result = srd_run(cluster, spec, "--stages", "reflect")
    finally:
        cluster.remove_node(blind)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"run.output_dir: 1 of 4 nodes cannot see {tmp_path / 'runs' / 'blind'}" in result.stderr
    assert not (tmp_path / "runs" / "blind" / "reflect").exists()


def test_a_stage_waits_for_nodes_to_join_then_runs(cluster, tmp_path, tiny_models, demo_data):
    """Attached to a cluster that may grow (no autoscaling config: nodes may join by hand), a stage that asks
    for more than it has says so and waits; once a node joins, it runs."""
    extra = "reflect: {concurrency: 3, shard_rows: 40, generation: {max_new_tokens: 8}}\nengine: {name: transformers}\n"
    spec = spec_file(tmp_path, tiny_models, demo_data, str(tmp_path / "runs"), "grow", extra)
    job = subprocess.Popen(**srd_command(cluster, spec, "--stages", "reflect"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    deadline = time.monotonic() + 300
    while not any("waiting up to 600s for nodes to join" in line for line in lines):
        assert job.poll() is None and time.monotonic() < deadline, "".join(lines)
        lines.append(job.stdout.readline())
    third = cluster.add_node(num_cpus=1)
    try:
        output, _ = job.communicate(timeout=600)
    finally:
        cluster.remove_node(third)
    assert job.returncode == 0, "".join(lines) + output
    assert "reflect: the stage runs 3 reflect actors (1 CPU, 0 GPU each) at once" in "".join(lines)
    scored = pq.read_table(tmp_path / "runs" / "grow" / "reflect" / "shards")
    assert scored.num_rows == 160


NODE_LOSS = PIPELINE.replace("log_every_steps: 2", "log_every_steps: 1\n  checkpoint_every_steps: 2").replace(
    "steps: 2,", "steps: 4,"
)


@pytest.mark.node_loss
def test_losing_a_node_mid_distill_resumes_from_the_last_committed_checkpoint(
    cluster, object_store, tmp_path, tiny_models, demo_data
):
    spec = spec_file(tmp_path, tiny_models, demo_data, f"s3://{object_store.path}/loss", "loss", NODE_LOSS)
    run_dir = object_store / "loss" / "loss"
    job = subprocess.Popen(**srd_command(cluster, spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900

    def committed() -> bool:  # Ray Train writes this snapshot once a checkpoint is registered
        try:
            return any(info.path.endswith("checkpoint_manager_snapshot.json")
                       for info in (run_dir / "distill" / "ray_train").files())  # fmt: skip
        except OSError:
            return False

    while not committed():
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
        time.sleep(0.5)
    cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
    time.sleep(5)
    cluster.add_node(num_cpus=1)
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["global_step"] for m in metrics if "event" not in m]
    resumed = [m for m in metrics if m.get("event") == "resumed"]
    assert resumed and resumed[0]["global_step"] >= 2, "resumed from a checkpoint, not from the start"
    assert sorted(set(steps)) == list(range(1, 13)) and len(steps) - len(set(steps)) <= 4
    shards = (run_dir / "reflect" / "shards").files()
    ids = [i for info in shards for i in Location(run_dir.filesystem, info.path).read_parquet(columns=["example_id"])
           ["example_id"].to_pylist()]  # fmt: skip
    assert len(ids) == len(set(ids)) == 160
