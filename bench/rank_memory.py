"""The driver's own memory in the rank and teacher_signal stages, this code beside an earlier commit (#29).

The rank stage runs in the driver (the ``srd run`` process): it reads every scored row, ranks them and
writes the buckets. A stage that lasts a second or two is missed by ``bench/scale.py``'s 0.5 s sampler,
so this probe runs it in-process on a finished scale run and samples the process's private memory (USS)
every 20 ms. Printed per code, size and stage: MB above the process's start after loading the training
data, and the stage's peak. The rank output is rewritten (identical: ranking is deterministic).
``--stages teacher_signal``: that stage's driver part (the rows it sends, the checks and the tail-mass
summary over the stored signal); the run's signal shards are all there, so no engine runs.

    python bench/scale.py --sizes 10000,30000 --before-sizes ''   # makes the runs probed here
    python bench/rank_memory.py --before 9576c99                  # 10k and 30k, about 2 minutes
    python bench/rank_memory.py --before a968341 --sizes 30000,100000 --one-row-group --name shard_row_groups
    python bench/rank_memory.py --before 3caa362 --sizes 10000,100000 --stages rank,teacher_signal \
        --one-row-group --name driver_stage_memory

``--one-row-group`` also probes this code on a copy of each run whose reflect shards are rewritten as one
Parquet row group each, as this code writes them (``bench/results/shard_row_groups.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MACHINE, ROOT, save_results

RUNS = ROOT / "bench" / ".cache" / "scale" / "runs"

PROBE = """
import json, sys, threading, time
import psutil
from srd_ray import pipeline
from srd_ray.run_dir import RunDirectory
from srd_ray.spec import load_spec

spec, stage = load_spec(sys.argv[1]), sys.argv[2]
# As run_pipeline does (codes before configure_driver_memory set the Arrow pool alone).
getattr(pipeline, "configure_driver_memory", pipeline.use_the_system_allocator_for_arrow)()
run = pipeline.Run(spec, RunDirectory(spec), pipeline.fingerprints(spec), (stage,))
process, peak, done = psutil.Process(), [0], threading.Event()
uss = lambda: process.memory_full_info().uss
start = uss()
run.train
loaded = uss()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], uss())
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
getattr(pipeline, "_" + stage)(run)
done.set()
mb = lambda value: round(value / 2**20, 1)
print(json.dumps({"after_load_mb": mb(loaded - start), "peak_mb": mb(max(peak[0], loaded) - start)}))
"""


def probe(checkout: Path, rows: int, stage: str, spec: Path | None = None) -> dict:
    spec = spec or RUNS / f"after-{rows}" / "spec.yaml"
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(spec), stage], capture_output=True, text=True, cwd=checkout,
                          env=env, check=True)  # fmt: skip
    return {"rows": rows, "stage": stage, **json.loads(done.stdout.strip().splitlines()[-1])}


def one_row_group_copy(rows: int) -> Path:
    """A copy of the scale run's reflect stage whose shards are one Parquet row group each, as this code
    writes them (runs made before it wrote 16-row groups); returns its spec."""
    import pyarrow.parquet as pq
    import yaml

    from srd_ray import storage

    source, copy = RUNS / f"after-{rows}", RUNS / f"one-row-group-{rows}"
    shutil.rmtree(copy, ignore_errors=True)
    (copy / "scale" / "reflect" / "shards").mkdir(parents=True)
    spec = yaml.safe_load((source / "spec.yaml").read_text())
    spec["run"]["output_dir"] = str(copy)
    (copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(source / "scale" / "run.json", copy / "scale" / "run.json")
    for shard in sorted((source / "scale" / "reflect" / "shards").glob("*.parquet")):
        storage.write_parquet(copy / "scale" / "reflect" / "shards" / shard.name, pq.read_table(shard))
    return copy / "spec.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the earlier commit to probe beside this code")
    parser.add_argument("--sizes", default="10000,30000")
    parser.add_argument(
        "--one-row-group", action="store_true", help="also probe this code on reflect shards of one row group each"
    )
    parser.add_argument("--stages", default="rank", help="comma-separated: rank, teacher_signal")
    parser.add_argument("--name", default="rank_memory", help="results file name: bench/results/<name>.{json,md}")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    stages = args.stages.split(",")
    after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    runs = [{"code": "after", **probe(ROOT, n, stage)} for n in sizes for stage in stages]
    if args.one_row_group:  # only the rank stage reads the reflect shards
        runs += [{"code": "after, one row group", **probe(ROOT, n, "rank", one_row_group_copy(n))} for n in sizes]
    checkout = Path(tempfile.mkdtemp(prefix="rank-before-")) / "checkout"
    subprocess.run(["git", "worktree", "add", "--detach", str(checkout), args.before], cwd=ROOT, check=True)
    try:
        runs += [{"code": "before", **probe(checkout, n, stage)} for n in sizes for stage in stages]
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, check=False)
    lines = [f"# The driver's memory in the {' and '.join(stages)} stage{'s' * (len(stages) > 1)} (#29)", "",
             f"Machine: {MACHINE}. Protocol: the `bench/rank_memory.py` docstring. Codes: `after` = "
             f"{after.stdout.strip()}, `before` = {args.before}. MB of private memory above the process's start.", "",
             "| code | rows | stage | after loading the data | stage peak |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['code']} | {r['rows']} | {r.get('stage', 'rank')} | {r['after_load_mb']} | {r['peak_mb']} |"
              for r in runs]  # fmt: skip
    results = {"machine": MACHINE, "after": after.stdout.strip(), "before": args.before, "runs": runs}
    save_results(args.name, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
