"""Kill a running job and rerun it: finished work is kept, the rest is done once.

A job killed in distill stage 2 and resumed there is checked on an object store
(``test_object_store``), by SIGINT on a cluster and by a killed Train worker (``test_cluster_jobs``)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from srd_ray.data import load_source
from srd_ray.spec import load_spec
from tests.processes import (
    demo_data_yaml,
    kill_job,
    rerun_job,
    start_job,
    wait_for_files,
    write_spec,
)


@pytest.mark.slow
def test_killed_reflect_resumes_with_exactly_the_input_ids(tmp_path, tiny_models, demo_data):
    spec_path = write_spec(
        tmp_path,
        tiny_models,
        demo_data_yaml(demo_data, heldout=False)
        + """engine: {name: transformers}
reflect:
  shard_rows: 5
  generation: {temperature: 1.0, max_new_tokens: 96}
""",
    )
    spec = load_spec(spec_path)
    shards_dir = Path(spec.run_dir) / "reflect" / "shards"
    job = start_job(spec_path, "--stages", "reflect")
    wait_for_files(shards_dir, "shard-*.parquet", 3, job)
    kill_job(job)
    survivors = {path.name: path.stat().st_mtime_ns for path in shards_dir.glob("shard-*.parquet")}
    total_shards = -(-160 // 5)
    assert 3 <= len(survivors) < total_shards, "the kill should land mid-stage"

    rerun = rerun_job(spec_path, "--stages", "reflect")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(survivors)} already done" in rerun.stderr
    # Shards finished before the kill are reused untouched; no partial files are left.
    assert {name: (shards_dir / name).stat().st_mtime_ns for name in survivors} == survivors
    assert not list(shards_dir.glob(".*"))
    scored_ids = [
        example_id
        for path in sorted(shards_dir.glob("shard-*.parquet"))
        for example_id in pq.read_table(path, columns=["example_id"])["example_id"].to_pylist()
    ]
    input_ids = load_source(spec.data.train, spec.data, label="train").table["example_id"].to_pylist()
    assert len(scored_ids) == len(set(scored_ids)) == len(input_ids)
    assert set(scored_ids) == set(input_ids)
    print(
        f"killed after {len(survivors)}/{total_shards} shards; rerun scored the other {total_shards - len(survivors)}"
    )
