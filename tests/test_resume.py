"""Kill a running job and rerun it: finished work is kept, the rest is done once."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from srd_ray.data import load_source
from srd_ray.spec import load_spec
from tests.processes import (
    DISTILL_3_STAGES,
    check_resumed_in_stage_2,
    demo_data_yaml,
    in_stage_2,
    kill_job,
    rerun_job,
    start_job,
    step_metrics,
    wait_for_files,
    wait_until,
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


@pytest.mark.slow
def test_distill_killed_in_stage_2_resumes_there(tmp_path, tiny_models, demo_data):
    """2 gloo workers, 3 stages x 2 epochs; SIGKILL the job in stage 2 (index 1), rerun, check the steps."""
    spec_path = write_spec(
        tmp_path,
        tiny_models,
        demo_data_yaml(demo_data)
        + """engine: {name: transformers}
reflect: {generation: {max_new_tokens: 8}}
"""
        + DISTILL_3_STAGES,
    )
    run_dir = Path(load_spec(spec_path).run_dir)
    job = start_job(spec_path, "--stages", "reflect,rank,distill")
    wait_until(lambda: in_stage_2(run_dir, from_step=24), "stage 2", job)
    kill_job(job)
    killed_at = max(r["global_step"] for r in step_metrics(run_dir))
    assert killed_at < 30, "the kill should land inside stage 2 (steps 11..30)"

    rerun = rerun_job(spec_path, "--stages", "reflect,rank,distill")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed_at = check_resumed_in_stage_2(run_dir, killed_at)
    summary = json.loads((run_dir / "run.json").read_text())["stages"]["distill"]["summary"]
    heldout = {r["after_stage"]: r["heldout_kd"] for r in summary["heldout_kd"]}
    assert sorted(heldout) == [-1, 0, 1, 2]
    assert heldout[2] < heldout[-1], f"held-out KD loss should fall: {heldout}"
    print(f"killed at step {killed_at}; rerun resumed at step {resumed_at} (stage 2); held-out KD {heldout}")
