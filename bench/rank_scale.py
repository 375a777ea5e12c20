"""Benchmark: the whole rank stage (read reflect shards, rank, write buckets) at 1M and 10M rows.

Each size runs in a fresh subprocess so its peak RSS is its own. Synthetic scored rows have realistic
ties: ROUGE-L is 0 for 40% of rows and otherwise rounded to 2 decimals; CE is rounded to 3 decimals.
Results: bench/results/rank_scale.json and .md.

    python bench/rank_scale.py [ROWS ...]      # default: 1000000 10000000
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results"
SHARD_ROWS = 1_000_000


def write_shards(rows: int, folder: Path) -> None:
    rng = np.random.default_rng(0)
    shards = folder / "reflect" / "shards"
    shards.mkdir(parents=True)
    for index, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        rouge = np.where(rng.random(n) < 0.4, 0.0, np.round(rng.random(n), 2))
        table = pa.table(
            {
                "example_id": pa.array(
                    np.char.mod("%020x", np.arange(start, start + n, dtype=np.uint64) * np.uint64(2654435761))
                ),
                "input_position": np.arange(start, start + n, dtype=np.int64),
                "rouge_l": rouge,
                "student_ce": np.round(rng.gamma(2.0, 1.0, n), 3),
                "response_tokens": rng.integers(1, 256, n, dtype=np.int32),
            }
        )
        pq.write_table(table, shards / f"shard-{index:05d}.parquet")


def measure(folder: Path) -> dict:
    """Runs inside the subprocess: the stage exactly as the pipeline runs it."""
    from srd_ray.rank import run_rank
    from srd_ray.reflect import read_scored
    from srd_ray.spec import RankSpec

    started = time.perf_counter()
    scored = read_scored(folder / "reflect")
    read_s = time.perf_counter() - started
    summary = run_rank(RankSpec(), scored, folder / "rank")
    wall = time.perf_counter() - started
    return {
        "rows": summary["rows"],
        "wall_s": round(wall, 2),
        "read_s": round(read_s, 2),
        "rank_and_write_s": round(wall - read_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bucket_rows": [b["rows"] for b in summary["buckets"]],
    }


def main(sizes: list[int]) -> None:
    results = []
    for rows in sizes:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            write_shards(rows, folder)
            output = subprocess.run(
                [sys.executable, __file__, "--measure", str(folder)], check=True, capture_output=True, text=True
            ).stdout
            result = json.loads(output.strip().splitlines()[-1])
            print(json.dumps(result))
            results.append(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rank_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| rows | wall s | read s | rank+write s | peak RSS MB |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['rows']:,} | {r['wall_s']} | {r['read_s']} | {r['rank_and_write_s']} | {r['peak_rss_mb']} |"
        for r in results
    ]
    (RESULTS / "rank_scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(Path(sys.argv[2]))))
    else:
        main([int(a) for a in sys.argv[1:]] or [1_000_000, 10_000_000])
