"""How much memory a driver keeps after reading tables, by Arrow memory pool (#29).

Protocol (results in bench/results/arrow_pool.{json,md}): in a fresh process per pool and size, read
what the distill driver reads from a finished ``bench/scale.py`` run (the training columns of the 3 kept
rank buckets and the teacher signal's token counts), then record the process's private memory (USS)
growth, the bytes Arrow still holds live, and the growth after ``release_unused()``. Pools: Arrow's
default (mimalloc) and the system allocator, which ``run_pipeline`` now uses in the driver.

    python bench/scale.py --sizes 10000,30000 --before-sizes ''   # makes the runs read here
    python bench/arrow_pool.py
"""

from __future__ import annotations

import json
import subprocess
import sys

from common import MACHINE, ROOT, save_results

RUNS = ROOT / "bench" / ".cache" / "scale" / "runs"
SIZES = (10_000, 30_000)
POOLS = ("mimalloc", "system")

READ = """
import json, sys, psutil, pyarrow as pa
from srd_ray.storage import Location
from srd_ray.distill_stage import read_training_text
from srd_ray.rank import bucket_dir
from srd_ray.teacher_signal import read_signal
import srd_ray.models  # the driver's imports, so that they are not counted
if sys.argv[2] == "system":
    from srd_ray.pipeline import use_the_system_allocator_for_arrow  # as the driver does
    use_the_system_allocator_for_arrow()
process = psutil.Process()
mb = lambda: process.memory_full_info().uss / 2**20
base = mb()
rank_dir = Location.of(sys.argv[1] + "/scale/rank")  # the buckets' text, as the driver read them up to 3caa362
rows = pa.concat_tables([read_training_text(bucket_dir(rank_dir, b)) for b in range(3)])
counts = read_signal(sys.argv[1] + "/scale/teacher_signal", ["example_id", "num_tokens"])
grown, live = mb() - base, pa.total_allocated_bytes() / 2**20
pa.default_memory_pool().release_unused()
print(json.dumps({"rows": rows.num_rows, "live_mb": round(live, 1), "uss_growth_mb": round(grown, 1),
                  "after_release_mb": round(mb() - base, 1)}))
"""


def measure(size: int, pool: str) -> dict:
    run = RUNS / f"after-{size}"
    if not (run / "scale" / "rank").exists():
        raise SystemExit(f"{run} has no finished scale run: run bench/scale.py first (see the docstring)")
    done = subprocess.run([sys.executable, "-c", READ, str(run), pool], capture_output=True, text=True, cwd=ROOT,
                          check=True)  # fmt: skip
    return {"size": size, "pool": pool, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    results = {"machine": MACHINE, "runs": [measure(size, pool) for size in SIZES for pool in POOLS]}
    lines = [
        "# Driver memory kept after reading, by Arrow memory pool (#29)", "",
        f"Machine: {MACHINE}. Protocol: the `bench/arrow_pool.py` docstring.", "",
        "| scale run | pool | rows read | live Arrow MB | USS growth MB | after release_unused MB |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in results["runs"]:
        lines.append(f"| {r['size']} | {r['pool']} | {r['rows']} | {r['live_mb']} | {r['uss_growth_mb']} | "
                     f"{r['after_release_mb']} |")  # fmt: skip
    save_results("arrow_pool", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
