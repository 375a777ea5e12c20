"""What a Train worker pays to read its rows as it trains (#29): index memory and read time per row.

Protocol (results in bench/results/row_reads.{json,md}):

- **Rows:** a finished ``bench/scale.py`` run (default the 20k-row one: three rank buckets of 5,000 rows,
  a top-k signal of k 64 over 20,000 rows, 1,250 Parquet row groups) and its student's tokenizer.
- **Worker:** ``RowPool`` opened as a Train worker opens it (the stage-3 pool: buckets 0..2, lengths by
  tokenizing every row once, the signal's index), in a fresh process per code.
- **Measured:** setup wall time (first open on this node, then again with the node's copy in place:
  the code before streaming's node copy is none); Python heap the index holds (tracemalloc) and the
  process's resident memory after setup minus before (RSS); then 1,600 rows read in micro-batches of 8 in
  a seeded random order (the plan's access pattern), ms per row for the text (read + tokenize) and the
  signal (read + made tensors).
- **Side by side:** ``--before`` (default d366a4c, Parquet row groups through a small cache) runs the
  same measurement from a git worktree of that commit, in the same invocation.

    python bench/row_reads.py                       # ~2 minutes on 2 cores
    python bench/row_reads.py --run bench/.cache/scale/runs/after-6000/scale
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import psutil
from common import MACHINE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_RUN = ROOT / "bench/.cache/scale/runs/after-20000/scale"
ROWS_READ, MICRO_BATCH = 1600, 8


def measure(run: Path, tokenizer_path: Path, cache: Path) -> dict:
    """One code's numbers (run in a fresh process: see ``main``)."""
    from transformers import AutoTokenizer

    from srd_ray.distill.pool import RowPool

    spec = json.loads((run / "run.json").read_text())["spec"]
    stages = spec["distill"]["stages"]
    tails = tuple(sorted({s["temperature"] for s in stages} - {1.0}))
    data = SimpleNamespace(**{k: spec["data"][k] for k in ("max_prompt_tokens", "max_response_tokens")})
    names = [f"bucket_{b}" for b in range(len(stages))]
    files = {name: sorted((run / "distill/rows" / name).glob("*.parquet")) for name in names}
    files["teacher_signal"] = sorted((run / "teacher_signal/shards").glob("*.parquet"))
    host = SimpleNamespace(files=files.__getitem__)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    os.environ["SRD_CACHE_DIR"] = str(cache)
    result = {"rows": {name: sum(_rows(f) for f in paths) for name, paths in files.items()}}
    for attempt in ("first", "again"):
        rss = psutil.Process().memory_info().rss
        tracemalloc.start()
        started = time.perf_counter()
        rows = RowPool(host, tokenizer, data, True, tails)
        pool = rows.stage(names)
        result[f"setup_s_{attempt}"] = round(time.perf_counter() - started, 2)
        result[f"index_heap_mb_{attempt}"] = round(tracemalloc.get_traced_memory()[0] / 1e6, 2)
        tracemalloc.stop()
        result[f"index_rss_mb_{attempt}"] = round((psutil.Process().memory_info().rss - rss) / 1e6, 1)
        if attempt == "first":
            del rows, pool  # the second open is measured from scratch, the node copy in place
    order = list(range(len(pool)))
    random.Random(0).shuffle(order)
    text_s = signal_s = 0.0
    for start in range(0, ROWS_READ, MICRO_BATCH):
        batch = order[start : start + MICRO_BATCH]
        began = time.perf_counter()
        examples = pool.examples(batch)
        middle = time.perf_counter()
        rows.signals_for(pool.ids(batch), examples)
        text_s, signal_s = text_s + middle - began, signal_s + time.perf_counter() - middle
    result["text_ms_per_row"] = round(text_s / ROWS_READ * 1e3, 3)
    result["signal_ms_per_row"] = round(signal_s / ROWS_READ * 1e3, 3)
    result["pool_rows"] = len(pool)
    return result


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def run_code(checkout: Path, run: Path, tokenizer: Path) -> dict:
    """``measure`` in a fresh process with ``checkout`` on the path and an empty node cache."""
    with tempfile.TemporaryDirectory(prefix="row-reads-cache-") as cache:
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import row_reads; "
                f"print(json.dumps(row_reads.measure(*map(__import__('pathlib').Path, sys.argv[1:4]))))")  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, "-c", code, str(run), str(tokenizer), cache], env=env, cwd=checkout,
                              capture_output=True, text=True, check=True)  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(summary: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "row_reads.json").write_text(json.dumps(summary, indent=2) + "\n")
    keys = ["setup_s_first", "setup_s_again", "index_heap_mb_again", "index_rss_mb_again",
            "text_ms_per_row", "signal_ms_per_row"]  # fmt: skip
    lines = [
        "# Reading rows as a Train worker trains (#29)",
        "",
        f"Machine: {summary['machine']}. Protocol: the `bench/row_reads.py` docstring. Rows: `{summary['run']}` "
        f"({summary['pool_rows']} training rows in the pool, {summary['signal_rows']} signal rows). "
        f"Codes: `after` = {summary['after_commit']}, `before` = {summary['before_commit']}.",
        "",
        "| code | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for code in ("before", "after"):
        lines.append(f"| {code} | " + " | ".join(str(summary[code][k]) for k in keys) + " |")
    (RESULTS / "row_reads.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="a finished bench/scale.py run directory")
    parser.add_argument("--models", type=Path, default=ROOT / "bench/.cache/preflight/quickstart/prepare")
    parser.add_argument("--before", default="d366a4c", help="the code to compare with")
    args = parser.parse_args()
    run, tokenizer = args.run.resolve(), (args.models / "student").resolve()
    after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    checkout = Path(tempfile.mkdtemp(prefix="row-reads-before-")) / "checkout"
    subprocess.run(["git", "worktree", "add", "--detach", str(checkout), args.before], cwd=ROOT, check=True)
    try:
        before = run_code(checkout, run, tokenizer)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, check=False)
    measured = run_code(ROOT, run, tokenizer)
    summary = {"machine": MACHINE, "run": str(run.relative_to(ROOT)),
               "before_commit": args.before, "after_commit": after.stdout.strip(), "pool_rows": measured["pool_rows"],
               "signal_rows": measured["rows"]["teacher_signal"], "before": before, "after": measured}  # fmt: skip
    write_results(summary)
    print((RESULTS / "row_reads.md").read_text())


if __name__ == "__main__":
    main()
