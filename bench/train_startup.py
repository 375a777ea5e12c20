"""What one Ray Train job costs before its first step: the floor under every training stage's wall time
(teacher_sft, distill, each refresh stage) and under the suite's end-to-end tests.

Protocol: a private local Ray started as ``srd run`` starts it (``ensure_ray``: dashboard on loopback,
2 CPUs here); ``TorchTrainer.fit()`` of a train function that does nothing, gloo, 1 and then 2 workers,
``--repeats`` jobs each. Per job: fit's wall time and, from Ray Train's controller log, how long the
controller took to start (fit called -> its first log line), to create the worker actors, to initialise
the train context on them (torch process group) and the whole worker-group start. Next to it: the import
of ``srd_ray.distill.worker`` in a fresh interpreter, which every Train worker of ours adds before its
first step. Run it on an otherwise idle machine.

    python bench/train_startup.py             # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import MACHINE, save_results  # noqa: E402

PHASES = {  # the controller's own "[Worker Group Initialization]" timings, by the words that start them
    "worker_actors_s": "worker actors created in",
    "train_context_s": "Train context initialized on workers in",
    "worker_group_s": "Worker group startup completed in",
}


def empty_train_function(config: dict[str, Any]) -> None:
    """Nothing: the job's wall time is all start-up and shut-down."""


def controller_log(session_dir: str, seen: set[str]) -> list[dict[str, Any]]:
    """The records of the controller log that appeared since ``seen`` (one controller per job)."""
    paths = set(glob.glob(f"{session_dir}/logs/train/ray-train-sys-controller-*.log")) - seen
    seen |= paths
    return [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line]


def phases(records: list[dict[str, Any]], fit_called: float) -> dict[str, float]:
    first = min(datetime.strptime(r["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp() for r in records)
    result = {"controller_start_s": round(first - fit_called, 2)}
    for key, words in PHASES.items():
        for record in records:
            if words in record["message"]:
                result[key] = float(record["message"].split(words)[1].split("s")[0])
    return result


def time_jobs(num_workers: int, repeats: int, session_dir: str, seen: set[str], store: Path) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    jobs = []
    for repeat in range(repeats):
        trainer = TorchTrainer(
            empty_train_function,
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers),
            run_config=RunConfig(name=f"w{num_workers}-{repeat}", storage_path=str(store)),
        )
        called = time.time()
        trainer.fit()
        job = {"num_workers": num_workers, "fit_s": round(time.time() - called, 2)}
        jobs.append(job | phases(controller_log(session_dir, seen), called))
        print(jobs[-1], flush=True)
    return jobs


def worker_import_s(repeats: int) -> list[float]:
    """A fresh interpreter importing what a Train worker of ours imports before its first step."""
    code = "import time; t = time.time(); import srd_ray.distill.worker; print(time.time() - t)"
    return [round(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True, cwd=ROOT).stdout), 2) for _ in range(repeats)]  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    keys = ["fit_s", "controller_start_s", "worker_actors_s", "train_context_s", "worker_group_s"]
    lines = [
        "# One Ray Train job's start-up (an empty train function)",
        "",
        f"Machine: {MACHINE}. Protocol: the `bench/train_startup.py` docstring. Ray {results['ray']}, "
        f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S {results['health_check_interval_s']} (the suite sets 0.25); seconds, "
        "mean (min-max) over the jobs after the first of each size; the first job after Ray started is shown alone.",
        "",
        "| workers | job | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for size in sorted({job["num_workers"] for job in results["jobs"]}):
        jobs = [job for job in results["jobs"] if job["num_workers"] == size]
        lines.append(f"| {size} | first | " + " | ".join(str(jobs[0].get(k, "-")) for k in keys) + " |")
        rest = [[job[k] for job in jobs[1:] if k in job] for k in keys]
        cells = [f"{statistics.mean(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-" for v in rest]
        lines.append(f"| {size} | later | " + " | ".join(cells) + " |")
    imports = results["worker_import_s"]
    lines += [
        "",
        f"`import srd_ray.distill.worker` in a fresh interpreter (torch, transformers, peft: what each of our Train "
        f"workers adds before its first step): {statistics.mean(imports):.1f} s (runs: {imports}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="train_startup")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import tempfile

    import ray

    from srd_ray.pipeline import ensure_ray
    from srd_ray.spec import RaySpec

    ensure_ray(RaySpec(num_cpus=2, object_store_memory_mb=512))
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as store:
        jobs = [job for size in (1, 2) for job in time_jobs(size, args.repeats, session_dir, seen, Path(store))]
    ray.shutdown()
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2 (default)")
    results = {"ray": ray.__version__, "jobs": jobs, "worker_import_s": worker_import_s(args.repeats),
               "health_check_interval_s": interval}  # fmt: skip
    save_results(args.name, results, markdown(results))


if __name__ == "__main__":
    main()
