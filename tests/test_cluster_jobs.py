"""A real local Ray cluster (`ray start --head`), jobs sent with `ray job submit`, and faults injected
into them: a killed reflect actor, a killed Ray Train worker, an interrupted driver."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from srd_ray.data import load_source
from srd_ray.spec import load_spec
from tests.processes import (
    DISTILL_3_STAGES,
    check_resumed_in_stage_2,
    demo_data_yaml,
    free_port,
    in_stage_2,
    kill_tree,
    rerun_job,
    start_job,
    step_metrics,
    wait_until,
    write_spec,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    gcs_address: str  # what `srd` / ray.init attach to (RAY_ADDRESS)
    dashboard: str  # the job server `ray job submit` talks to

    def submit(self, spec: Path) -> str:
        """`ray job submit --no-wait --working-dir <project> -- srd run SPEC`, as the README shows."""
        deadline = time.monotonic() + 90
        while True:
            result = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--no-wait",
                 "--working-dir", str(ROOT), "--", "srd", "run", str(spec)],
                capture_output=True, text=True, timeout=120, env=cluster_env(),
            )  # fmt: skip
            # A fresh head's job agent comes up a few seconds after its dashboard.
            if "No available agent" not in result.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert result.returncode == 0, result.stdout + result.stderr
        return next(word for word in result.stdout.split() if word.startswith("'raysubmit_")).strip("'")

    def wait(self, job_id: str, timeout: float = 600) -> tuple[str, str]:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard)
        deadline = time.monotonic() + timeout
        while (status := client.get_job_status(job_id)) not in {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.STOPPED,
        }:
            assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout}s"
            time.sleep(1)
        return str(status), client.get_job_logs(job_id)

    def alive_actors(self, class_name_part: str) -> list:
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
        return [actor for actor in actors if class_name_part in actor.class_name]


def cluster_env() -> dict[str, str]:
    # The cluster runs the project's virtualenv (the `srd` entry point and its packages), with token
    # auth off as on any private test cluster, and no RAY_ADDRESS of ours leaking into it.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "RAY_AUTH_MODE": "disabled"}


@contextlib.contextmanager
def head_node(log_path: Path, env: dict[str, str], client: dict[str, str] | None = None):
    """`ray start --head --node-ip-address=127.0.0.1 --num-cpus=2` with ``env``, stopped (the whole process
    tree) after; yields once its job server answers ``ray job list`` (run with ``client``, default ``env``).

    Every port is picked free: other local Rays (this test run's own, a benchmark) may be running, and
    `ray stop` would stop them all."""
    gcs_port, dashboard_port, agent_port, client_port = (free_port() for _ in range(4))
    log = log_path.open("w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=2", "--object-store-memory=400000000", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
         f"--ray-client-server-port={client_port}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    started = Cluster(gcs_address=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dashboard_port}")
    try:
        deadline = time.monotonic() + 120
        while True:  # the job server answers only once the dashboard is up
            listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", started.dashboard],
                                    capture_output=True, text=True, env=client or env, timeout=60)  # fmt: skip
            if listed.returncode == 0:
                break
            assert head.poll() is None and time.monotonic() < deadline, "the local cluster did not start"
            time.sleep(1)
        yield started
    finally:
        kill_tree(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)  # a disposable cluster: a head that ignores SIGTERM for 30 s is killed sooner
        kill_tree(head.pid)
        log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private test cluster, token auth off."""
    with head_node(tmp_path_factory.mktemp("cluster") / "ray-start.log", cluster_env()) as started:
        yield started


def scored_ids(run_dir: Path) -> list[str]:
    return [
        example_id
        for path in sorted((run_dir / "reflect" / "shards").glob("shard-*.parquet"))
        for example_id in pq.read_table(path, columns=["example_id"])["example_id"].to_pylist()
    ]


def kill_a_reflect_actor_once_shards_are_written(cluster: Cluster, shards: Path) -> str:
    wait_until(lambda: len(list(shards.glob("shard-*.parquet"))) >= 2, "2 reflect shards")
    victims = cluster.alive_actors("ReflectEngine")
    assert victims, f"no reflect actor alive: {[a.class_name for a in cluster.alive_actors('')]}"
    written = len(list(shards.glob("shard-*.parquet")))
    os.kill(victims[0].pid, signal.SIGKILL)
    return f"killed reflect actor pid {victims[0].pid} after {written}/32 shards"


def test_killed_reflect_actor_and_train_worker_are_replaced_within_the_job(cluster, tmp_path, tiny_models, demo_data):
    """A job sent with `ray job submit` runs the pipeline on the cluster (reflect to evaluate). A reflect
    actor killed mid-pass is replaced and no row is lost or doubled; a Train worker killed in stage 2 is
    replaced and the group goes on from the last checkpoint; both within the same job."""
    spec_path = write_spec(
        tmp_path,
        tiny_models,
        demo_data_yaml(demo_data, max_response_tokens=16)
        + """engine: {name: transformers}
reflect:
  concurrency: 2
  shard_rows: 5
  batch_size: 2  # slow enough that the engines are still busy once the writers (new processes) start
  generation: {temperature: 1.0, max_new_tokens: 96}
evaluate: {models: [student_after], seeds: [10], max_examples: 8, generation: {max_new_tokens: 8}}
"""
        + DISTILL_3_STAGES,
        name="faults",
    )
    spec = load_spec(spec_path)
    run_dir = Path(spec.run_dir)
    job_id = cluster.submit(spec_path)
    reflect_kill = kill_a_reflect_actor_once_shards_are_written(cluster, run_dir / "reflect" / "shards")
    wait_until(lambda: in_stage_2(run_dir, from_step=17), "stage 2")
    workers = cluster.alive_actors("RayTrainWorker")
    assert len(workers) == 2, [w.class_name for w in workers]
    killed_at = max(r["global_step"] for r in step_metrics(run_dir))
    os.kill(workers[1].pid, signal.SIGKILL)

    status, logs = cluster.wait(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "attaching to Ray at" in logs
    manifest = json.loads((run_dir / "run.json").read_text())
    assert {name: stage["status"] for name, stage in manifest["stages"].items()} == {
        name: "complete" for name in ("reflect", "rank", "distill", "evaluate")
    }
    # Reflect: every input row scored exactly once, though an engine died mid-pass.
    ids = scored_ids(run_dir)
    input_ids = load_source(spec.data.train, spec.data, label="train").table
    assert len(ids) == len(set(ids)) == input_ids.num_rows == 160
    assert set(ids) == set(input_ids["example_id"].to_pylist())
    assert (run_dir / "distill" / "model" / "model.safetensors").exists()
    assert manifest["stages"]["evaluate"]["summary"]["student_after"]["heldout"]["examples"] == 8
    # The worker group restarted inside the same job, from a stage-2 checkpoint.
    resumed_at = check_resumed_in_stage_2(run_dir, killed_at + 5)  # +5: steps run while the kill landed
    print(f"{reflect_kill}; {len(ids)} ids, 0 duplicates. Killed a Train worker at step ~{killed_at}; "
          f"the group restarted at step {resumed_at} and finished")  # fmt: skip


def test_interrupted_driver_reruns_without_redoing_finished_work(cluster, tmp_path, tiny_models, demo_data):
    spec_path = write_spec(
        tmp_path,
        tiny_models,
        demo_data_yaml(demo_data, heldout=False)
        + """engine: {name: transformers}
reflect: {concurrency: 2, shard_rows: 20, generation: {max_new_tokens: 8}}
"""
        + DISTILL_3_STAGES,
        name="interrupted",
    )
    run_dir = Path(load_spec(spec_path).run_dir)
    # The driver attached to the cluster from outside it (RAY_ADDRESS), as when run on the head node.
    job = start_job(spec_path, ray_address=cluster.gcs_address)
    # In stage 2, once Ray Train has registered the checkpoint that ended stage 1.
    wait_until(lambda: in_stage_2(run_dir), "distill stage 2", job)
    job.send_signal(signal.SIGINT)
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 130, output[-3000:]
    assert "interrupted: rerun the same command" in output
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["stages"]["distill"]["status"] == "failed"
    assert "KeyboardInterrupt" in manifest["stages"]["distill"]["error"]
    shard_times = {p.name: p.stat().st_mtime_ns for p in (run_dir / "reflect" / "shards").glob("*.parquet")}
    rank_time = (run_dir / "rank" / "manifest.json").stat().st_mtime_ns
    interrupted_at = max(r["global_step"] for r in step_metrics(run_dir))

    rerun = rerun_job(spec_path, ray_address=cluster.gcs_address)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "reflect: already complete, skipping" in rerun.stderr
    assert "rank: already complete, skipping" in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "reflect" / "shards").glob("*.parquet")} == shard_times
    assert (run_dir / "rank" / "manifest.json").stat().st_mtime_ns == rank_time
    resumed_at = check_resumed_in_stage_2(run_dir, interrupted_at)
    assert "resuming at stage 1" in rerun.stderr
    print(
        f"SIGINT at step {interrupted_at}; rerun kept {len(shard_times)} shards and the rank, "
        f"resumed distill at step {resumed_at} (stage 2)"
    )


def test_a_job_is_submitted_as_the_readme_says_with_token_auth(tmp_path, tiny_models, demo_data):
    """Ray 2.60: once ~/.ray/auth_token exists (any local ray.init writes one, e.g. the quickstart's private
    Ray; here `ray get-auth-token --generate`), `ray start --head` turns token authentication on, and
    `ray job submit` without RAY_AUTH_MODE=token fails with Ray's AuthenticationError. With it, as the
    README's "Submitting jobs" says, the job runs."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in cluster_env().items() if k != "RAY_AUTH_MODE"} | {"HOME": str(home)}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    spec = write_spec(tmp_path, tiny_models, demo_data_yaml(demo_data, heldout=False, max_rows=16)
                      + "engine: {name: transformers}\nreflect: {generation: {max_new_tokens: 8}}\n",
                      name="token")  # fmt: skip
    client = env | {"RAY_AUTH_MODE": "token"}
    with head_node(tmp_path / "ray-start.log", env, client) as head:
        submit = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", str(ROOT), "--",
                  "srd", "run", str(spec), "--stages", "reflect"]  # fmt: skip
        refused = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=120)
        assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()
        done = subprocess.run(submit, capture_output=True, text=True, env=client, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout.lower()
    assert len(scored_ids(Path(load_spec(spec).run_dir))) == 16  # the job's part is the auth, not the rows
