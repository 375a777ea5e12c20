"""Where the driver's memory goes in the teacher_signal stage (#29): one stage, in-process, on a finished
``bench/scale.py`` run (its teacher_signal output is redone; nothing else changes).

Printed per run: the process's private memory (USS) after loading the training data and at its peak during
the stage (sampled every 0.2 s), the peak of Arrow's live bytes, and Python's traced peak. What is in
neither Arrow nor Python is native memory of other libraries (e.g. Ray's).

    python bench/scale.py --sizes 10000,30000 --before-sizes ''   # makes the runs probed here
    python bench/driver_probe.py 10000 30000
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from common import MACHINE, ROOT, save_results

RUNS = ROOT / "bench" / ".cache" / "scale" / "runs"

PROBE = """
import json, sys, threading, time, tracemalloc
import psutil, pyarrow as pa
from srd_ray import pipeline
from srd_ray.run_dir import RunDirectory
from srd_ray.spec import load_spec

spec = load_spec(sys.argv[1])
pipeline.use_the_system_allocator_for_arrow()  # as run_pipeline does
run = pipeline.Run(spec, RunDirectory(spec), pipeline.fingerprints(spec), ("teacher_signal",))
pipeline.ensure_ray(spec.ray)
process, peaks, done = psutil.Process(), {"uss": 0, "arrow": 0}, threading.Event()
uss = lambda: process.memory_full_info().uss

def sample():
    while not done.is_set():
        peaks["uss"], peaks["arrow"] = max(peaks["uss"], uss()), max(peaks["arrow"], pa.total_allocated_bytes())
        time.sleep(0.2)

base = uss()
threading.Thread(target=sample, daemon=True).start()
tracemalloc.start()
run.train
loaded = uss()
pipeline._teacher_signal(run)
done.set()
mb = lambda value: round(value / 2**20, 1)
print(json.dumps({"after_load_mb": mb(loaded - base), "peak_mb": mb(peaks["uss"] - base),
                  "arrow_peak_mb": mb(peaks["arrow"]), "python_peak_mb": mb(tracemalloc.get_traced_memory()[1])}))
"""


def probe(rows: int) -> dict:
    run = RUNS / f"after-{rows}"
    shutil.rmtree(run / "scale" / "teacher_signal", ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", PROBE, str(run / "spec.yaml")], capture_output=True, text=True,
                          cwd=ROOT, check=True)  # fmt: skip
    return {"rows": rows, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    runs = [probe(int(size)) for size in sys.argv[1:] or ["10000", "30000"]]
    lines = ["# The driver's memory in the teacher_signal stage (#29)", "",
             f"Machine: {MACHINE}. Protocol: the `bench/driver_probe.py` docstring. MB above the process's start.", "",
             "| rows | after loading the data | stage peak | Arrow live peak | Python traced peak |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['rows']} | {r['after_load_mb']} | {r['peak_mb']} | {r['arrow_peak_mb']} | {r['python_peak_mb']} |"
              for r in runs]  # fmt: skip
    save_results("driver_probe", {"machine": MACHINE, "runs": runs}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
