"""Dynamic reflection (rank.refresh: every_stage): the re-ranking core, the spec, and a whole run killed
during a refresh and rerun.

A refresh is a reflect pass (``run_reflect``) over the rows not yet admitted, so the killed run is also this
suite's check that a reflect pass killed mid-way reuses its finished shards untouched and scores the rest
exactly once. It trains on the stored top-k teacher signal (``distill.teacher_signal: topk``), so it is
also the suite's whole run of that signal: what the pass stored, training and the held-out KD metric on it,
another k refused, and the report. A job killed in distill stage 2 and resumed there is checked on an object store
(``test_several_nodes``), by SIGINT on a cluster and by a killed Train worker (``test_cluster_jobs``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from srd_ray.rank import bucket_quotas, rank_rows, refresh_rows, refresh_summary
from srd_ray.report import load_manifest, summary_lines, write_report
from srd_ray.spec import RankSpec, load_spec
from tests.processes import demo_data_yaml, kill_job, rerun_job, start_job, step_metrics, wait_for_files, write_spec


def scored(ids: list[str], rouge: list[float], ce: list[float]) -> pa.Table:
    return pa.table({"example_id": ids, "input_position": list(range(len(ids))), "rouge_l": rouge, "student_ce": ce})


def initial_ranking(n: int = 12) -> pa.Table:
    """e0 easiest ... e{n-1} hardest: ROUGE falls and CE rises with the index."""
    ids = [f"e{i}" for i in range(n)]
    return rank_rows(scored(ids, [1 - i / n for i in range(n)], [float(i) for i in range(n)]), RankSpec())


def test_refresh_admits_the_easiest_rows_left_and_lays_out_the_rest():
    initial = initial_ranking()  # 4 buckets of 3: e0-e2, e3-e5, e6-e8, e9-e11
    left = [f"e{i}" for i in range(3, 12)]
    # The trained student now finds the rows the other way round: e11 easiest.
    rescored = scored(left, [i / 12 for i in range(3, 12)], [float(12 - i) for i in range(3, 12)])
    refreshed = refresh_rows(rescored, RankSpec(), bucket=1, quotas=bucket_quotas(initial, None, 4))
    assert refreshed["example_id"].to_pylist() == [f"e{i}" for i in range(11, 2, -1)]
    assert refreshed["bucket"].to_pylist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    summary = refresh_summary(refreshed, initial, bucket=1)
    assert summary["candidates"] == 9 and summary["admitted"] == 3
    assert summary["spearman_with_initial"] == pytest.approx(-1.0)
    assert summary["changed_bucket"] == 6  # all but the middle three (bucket 2 both times)
    assert summary["admitted_by_initial_bucket"] == {"3": 3}
    assert summary["signals"]["rouge_l"]["admitted_now"] == pytest.approx(np.mean([9 / 12, 10 / 12, 11 / 12]))
    assert summary["signals"]["rouge_l"]["admitted_initially"] == pytest.approx(
        np.mean([1 - i / 12 for i in (9, 10, 11)])
    )


def test_refresh_that_agrees_with_the_initial_order_changes_nothing():
    initial = initial_ranking()
    left = initial.filter(pa.compute.greater_equal(initial["bucket"], 2))  # after stage 1: buckets 2 and 3 left
    candidates = left.select(["example_id", "input_position", "rouge_l", "student_ce"])
    refreshed = refresh_rows(candidates, RankSpec(), 2, bucket_quotas(initial, None, 4))
    summary = refresh_summary(refreshed, initial, bucket=2)
    assert summary["spearman_with_initial"] == pytest.approx(1.0) and summary["changed_bucket"] == 0
    assert refreshed["bucket"].to_pylist() == [2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ("rank: {refresh: every_stage, order: random}", "order random has no easiest rows"),
        ("rank: {refresh: every_stage}\ndistill: {curriculum: none}", "needs distill.curriculum srd"),
    ],
)
def test_spec_refuses_refresh_without_an_easy_to_hard_curriculum(tmp_path, sections, message):
    from srd_ray.errors import SpecError

    path = tmp_path / "spec.yaml"
    path.write_text(f"run: {{name: r}}\nmodels: {{teacher: {{path: t}}, student: {{path: s}}}}\n"
                    f"data: {{train: {{path: d.jsonl}}}}\n{sections}\n")  # fmt: skip
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def bucket_ids(folder: Path) -> list[str]:
    return [i for path in sorted(folder.glob("*.parquet")) for i in pq.read_table(path)["example_id"].to_pylist()]


@pytest.mark.slow
def test_run_killed_during_a_refresh_resumes_it_and_admits_every_row_once(tmp_path, tiny_models, demo_data, capsys):
    """160 rows, 4 buckets of 40, 3 stages of 1 epoch, the stored top-k teacher signal; SIGKILL while the
    student after stage 0 re-reflects the 120 rows left, rerun."""
    spec_path = write_spec(
        tmp_path, tiny_models, demo_data_yaml(demo_data) + """engine: {name: transformers}
reflect: {concurrency: 1, batch_size: 10, shard_rows: 5, generation: {max_new_tokens: 8}}
rank: {refresh: every_stage}
teacher_signal: {k: 8}
distill:
  teacher_signal: topk
  num_workers: 1
  batch_size: 8
  log_every_steps: 1
  stages:
    - {epochs: 1, kd_weight: 0.8, temperature: 1.0, lr: 1.0e-3}
    - {epochs: 1, kd_weight: 0.9, temperature: 1.5, lr: 1.0e-3}
    - {epochs: 1, kd_weight: 1.0, temperature: 2.0, lr: 1.0e-3}
""", name="refresh")  # fmt: skip
    distill = Path(load_spec(spec_path).run_dir) / "distill"
    stages = ("--stages", "reflect,rank,teacher_signal,distill")
    job = start_job(spec_path, *stages)
    shards = distill / "refresh_1" / "shards"
    wait_for_files(shards, "shard-*.parquet", 2, job, timeout=400)
    kill_job(job)
    assert not (distill / "refresh_1" / "rank").exists(), "the kill should land mid-refresh"
    survivors = {path.name: path.stat().st_mtime_ns for path in shards.glob("shard-*.parquet")}

    rerun = rerun_job(spec_path, *stages)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "stage 0 already trained" in rerun.stderr
    assert f"reflect: 120 rows in 24 shards, {len(survivors)} already done" in rerun.stderr
    # Shards finished before the kill are reused untouched; no partial files are left; every row once.
    assert {name: (shards / name).stat().st_mtime_ns for name in survivors} == survivors
    assert not list(shards.glob(".*"))
    rescored = bucket_ids(shards)
    assert len(rescored) == len(set(rescored)) == 120
    buckets = [
        bucket_ids(distill.parent / "rank" / "bucket=0"),
        bucket_ids(distill / "refresh_1" / "rank" / "bucket=1"),
        bucket_ids(distill / "refresh_2" / "rank" / "bucket=2"),
    ]
    admitted = [i for bucket in buckets for i in bucket]
    assert [len(b) for b in buckets] == [40, 40, 40] and len(set(admitted)) == 120
    initial = {i for b in range(4) for i in bucket_ids(distill.parent / "rank" / f"bucket={b}")}
    assert len(initial) == 160 and set(admitted) <= initial
    assert set(rescored) == initial - set(buckets[0]), "refresh 1 scored exactly the rows stage 0 left"
    # The rerun scored only the shards the kill left undone; stage 1 then trained on what refresh 1 admitted.
    manifests = [json.loads((distill / f"refresh_{s}" / "rank" / "manifest.json").read_text()) for s in (1, 2)]
    assert manifests[0]["shards_reused"] >= 2 and manifests[0]["candidates"] == 120
    assert manifests[1]["shards_reused"] == 0 and manifests[1]["candidates"] == 80
    assert [m["after_stage"] for m in manifests] == [0, 1]
    # Global steps run on from stage to stage: 40 / 80 / 120 rows at 8 a step.
    steps = step_metrics(distill.parent)
    assert sorted({r["global_step"] for r in steps}) == list(range(1, 5 + 10 + 15 + 1))
    assert sorted({r["stage"] for r in steps}) == [0, 1, 2]
    run = json.loads((distill.parent / "run.json").read_text())["stages"]
    # The later buckets are chosen during training: the teacher pass covered every training row.
    assert run["teacher_signal"]["summary"]["rows"] >= 160
    summary = run["distill"]["summary"]
    assert [r["bucket"] for r in summary["refresh"]] == [1, 2]
    assert summary["refresh_cost"]["refreshes"] == 2 and summary["refresh_cost"]["generated_tokens"] > 0
    assert summary["optimizer_steps"] == 30
    for folder in ("after_stage_0", "after_stage_1", "model"):
        assert (distill / folder / "config.json").exists(), folder
    # The operator sees each refresh: in the run summary and in the report.
    lines = summary_lines(load_manifest(distill.parent))
    assert sum("refresh before stage" in line and "Spearman" in line for line in lines) == 2
    report = Path(write_report(distill.parent).path).read_text()
    assert "Refreshes (rank.refresh: every_stage)" in report
    check_the_topk_signal(spec_path, run, report, capsys)


def check_the_topk_signal(spec_path: Path, run: dict, report: str, capsys) -> None:
    """What the teacher pass stored (per token k ids and log-probs, the tail and its tempered mass at T 1.5
    and 2), that training and the held-out KD metric used it, that another k is refused, and the report."""
    from srd_ray.cli import main

    signal = run["teacher_signal"]["summary"]
    assert signal["k"] == 8 and signal["raw_bytes_per_token"] == 8 * 6 + 4 * 3
    assert signal["engine"] == "transformers" and signal["tail_temperatures"] == [1.5, 2.0]
    assert signal["stored_bytes_per_token"] < signal["raw_bytes_per_token"]
    assert list(signal["tail_mass"]) == ["1", "1.5", "2"] and 0 < signal["tail_mass"]["1"] < 1
    distill = run["distill"]["summary"]
    assert distill["teacher_signal"] == "topk"
    assert {r["teacher_signal"] for r in distill["heldout_kd"]} == {"topk"}
    assert [r["after_stage"] for r in distill["heldout_kd"]] == [-1, 0, 1, 2]
    capsys.readouterr()
    status = main(["run", str(spec_path), "--stages", "teacher_signal", "--set", "teacher_signal.k=16"])
    message = capsys.readouterr().err
    assert status == 2 and "teacher_signal.k: 8 -> 16" in message and "--redo teacher_signal" in message
    assert "top-k</td><td>8</td>" in report and f"T 2: {100 * signal['tail_mass']['2']:.1f}%" in report
