"""Node loss on a simulated cluster: what losing a worker node mid-stage costs, and that nothing is lost.

Protocol (results in bench/results/cluster_faults.{json,md}):

- A ``ray.cluster_utils.Cluster`` on this machine: a head with no CPU (the driver's node, as on a real
  cluster) and two worker nodes of one CPU each; ``run.output_dir`` on a local S3 server (moto), so no
  stage can lean on a shared local disk. ``srd run`` attaches to it (RAY_ADDRESS), as a submitted job does.
- The tiny pair and the quickstart's demo data (400 rows), ``teacher_signal: topk`` (k 8), 2 reflect and
  2 teacher-pass actors, 2 Train workers (DDP, gloo), checkpoints every 4 steps, 3 stages of 8 steps.
- Runs: ``clean`` (no fault), then one run per fault point, each on a fresh run directory: once the stage
  has written its first output (a reflect shard, a signal shard, a committed distill checkpoint), one worker node
  is removed (its raylet killed: every actor and worker on it dies), and a fresh one-CPU node is added
  10 s later.
- Reported per run: exit status, wall time and its ratio to ``clean``, for every stage output the rows
  lost and duplicated (``reflect`` and ``teacher_signal`` example ids against the input; must be 0 / 0),
  optimizer steps logged twice (work redone after the restart), the final held-out KD loss against
  ``clean``'s (the same within noise), and whether a rerun was needed (it must not be).

    python bench/cluster_faults.py        # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import MACHINE, save_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
# Where each stage's first output shows, and what it is: a shard, or (distill) Ray Train's snapshot of its
# registered checkpoints, written once the first checkpoint is committed (so the restart has one to resume).
FAULTS = {
    "reflect": ("reflect/shards", ".parquet"),
    "teacher_signal": ("teacher_signal/shards", ".parquet"),
    "distill": ("distill/ray_train", "checkpoint_manager_snapshot.json"),
}

PIPELINE = """
engine: {{name: transformers}}
reflect: {{concurrency: 2, shard_rows: 40, generation: {{max_new_tokens: 16}}}}
teacher_signal: {{concurrency: 2, k: 8, shard_rows: 40}}
distill:
  teacher_signal: topk
  num_workers: 2
  batch_size: 8
  log_every_steps: 1
  checkpoint_every_steps: 4
  stages:
    - {{steps: 8, kd_weight: 0.8, temperature: 1.0, lr: 1.0e-3}}
    - {{steps: 8, kd_weight: 0.9, temperature: 1.5, lr: 1.0e-3}}
    - {{steps: 8, kd_weight: 1.0, temperature: 2.0, lr: 1.0e-3}}
evaluate: {{seeds: [10], max_examples: 8, generation: {{max_new_tokens: 8}}}}
run: {{name: {name}, output_dir: {output_dir}}}
models: {{teacher: {{path: {teacher}}}, student: {{path: {student}}}}}
data:
  train: {{path: {train}}}
  eval_sets: {{heldout: {heldout}}}
  max_response_tokens: 32
"""


def inputs(work: Path) -> dict[str, str]:
    """The demo data and the tiny pair, made once."""
    from srd_ray.demo_data import write_demo_data
    from srd_ray.spec import TinyModelSpec, TinyModelsSpec
    from srd_ray.tiny_models import make_tiny_models

    demo = write_demo_data(work / "demo", train_rows=400, heldout_rows=24, pretrain_rows=400, seed=0)
    rows = [json.loads(line) for line in Path(demo["train"]).read_text().splitlines()]
    texts = [row["prompt"] + row["output"] for row in rows]
    spec = TinyModelsSpec(vocab_size=400, teacher=TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2,
                          pretrain_steps=20), student=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1,
                          pretrain_steps=20), pretrain_batch_size=16)  # fmt: skip
    models = make_tiny_models(work / "models", spec, texts, texts, seed=0)
    return {"train": demo["train"], "heldout": demo["heldout"], **models}


def outputs_written(run_dir: Any, folder: str, suffix: str) -> int:
    """How many files ending in ``suffix`` a stage has written under ``folder`` of the run directory."""
    location = run_dir / folder
    try:
        return len([info for info in location.files() if info.path.endswith(suffix)])
    except OSError:
        return 0


def run_once(cluster: Any, bucket: Any, data: dict[str, str], work: Path, name: str, fault: str | None) -> dict:
    """One ``srd run``; with ``fault``, a worker node removed once that stage wrote its first output."""
    spec = work / f"{name}.yaml"
    spec.write_text(PIPELINE.format(name=name, output_dir=f"s3://{bucket.path}/faults", **data))
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    started = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "srd_ray.cli", "run", str(spec)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(job.stdout), daemon=True)
    reader.start()
    removed_at = None
    run_dir = bucket / "faults" / name
    while fault is not None and job.poll() is None and removed_at is None:
        if outputs_written(run_dir, *FAULTS[fault]):
            victim = next(node for node in cluster.worker_nodes)
            cluster.remove_node(victim, allow_graceful=False)
            removed_at = time.perf_counter() - started
            time.sleep(10)
            cluster.add_node(num_cpus=1)
        time.sleep(0.5)
    status = job.wait(timeout=3600)
    reader.join(timeout=10)
    return {"name": name, "fault": fault, "exit": status, "wall_s": round(time.perf_counter() - started, 1),
            "node_removed_at_s": removed_at and round(removed_at, 1), "log_tail": "".join(log[-15:]),
            **accounting(run_dir, data["train"])}  # fmt: skip


def accounting(run_dir: Any, train_file: str) -> dict[str, Any]:
    """Rows lost and duplicated per stage output, steps logged twice, the final held-out KD loss."""
    from srd_ray.data import load_source
    from srd_ray.spec import DataSourceSpec, DataSpec
    from srd_ray.storage import Location

    data = DataSpec(train=DataSourceSpec(path=train_file), max_response_tokens=32)
    expected = set(load_source(data.train, data, label="train").table["example_id"].to_pylist())
    result: dict[str, Any] = {}
    for stage in ("reflect", "teacher_signal"):
        files = [info.path for info in (run_dir / stage / "shards").files() if info.path.endswith(".parquet")]
        ids = [
            i
            for path in files
            for i in Location(run_dir.filesystem, path).read_parquet(columns=["example_id"])["example_id"].to_pylist()
        ]
        wanted = expected if stage == "reflect" else set(ids)  # the pass covers kept buckets + held-out rows
        result[stage] = {"rows": len(ids), "lost": len(wanted - set(ids)), "duplicated": len(ids) - len(set(ids))}
    metrics = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["global_step"] for m in metrics if "event" not in m]
    heldout = [m["heldout_kd"] for m in metrics if m.get("event") == "heldout"]
    restarts = sum(1 for m in metrics if m.get("event") == "resumed")
    result["distill"] = {"steps_logged": len(steps), "steps_redone": len(steps) - len(set(steps)),
                         "final_step": max(steps), "restarts": restarts, "final_heldout_kd": heldout[-1]}  # fmt: skip
    return result


def markdown(results: dict[str, Any]) -> str:
    clean = next(r for r in results["runs"] if r["fault"] is None)
    lines = [
        "# Node loss on a simulated cluster", "",
        f"Machine: {results['machine']}. Protocol: the `bench/cluster_faults.py` docstring (head with no CPU + two "
        "1-CPU worker nodes, run directory on a local S3 server; a worker node removed once the stage wrote its "
        "first output, a fresh one added 10 s later).", "",
        "| fault | exit | wall s | vs clean | reflect lost / dup | signal lost / dup | distill steps redone | "
        "restarts | final held-out KD (clean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for run in results["runs"]:
        reflect, signal, distill = run["reflect"], run["teacher_signal"], run["distill"]
        lines.append(
            f"| {run['fault'] or 'none (clean)'} | {run['exit']} | {run['wall_s']} | "
            f"{run['wall_s'] / clean['wall_s']:.2f}x | {reflect['lost']} / {reflect['duplicated']} | "
            f"{signal['lost']} / {signal['duplicated']} | {distill['steps_redone']} | {distill['restarts']} | "
            f"{distill['final_heldout_kd']:.4f} ({clean['distill']['final_heldout_kd']:.4f}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=",".join(FAULTS), help="which fault points to run")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ray.cluster_utils import Cluster

    from tests.processes import local_object_store  # the same local S3 server the tests use

    work = (ROOT / "bench" / ".cache" / "cluster_faults").resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = inputs(work)
    with local_object_store(work / "cache", "srd-faults") as bucket:  # before the nodes: they inherit its env
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            runs = [run_once(cluster, bucket, data, work, "clean", None)]
            for fault in args.faults.split(","):
                runs.append(run_once(cluster, bucket, data, work, f"lose-node-in-{fault}", fault))
        finally:
            cluster.shutdown()
    results = {"machine": MACHINE, "runs": runs}
    save_results("cluster_faults", results, markdown(results))


if __name__ == "__main__":
    main()
