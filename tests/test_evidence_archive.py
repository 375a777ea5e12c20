"""The evidence script's run archive (bench/srd_evidence.py, #27): the tables are made from the committed
per-run evidence alone, so seeds finished in different sessions, on fresh machines, add up."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
srd_evidence = pytest.importorskip("srd_evidence")

SETS = ["dolly_test", "sinst_test"]
TASKS = {"brainstorming": 3, "task001": 1}


def evidence(score: float, trained: dict[str, int], inputs: str = "build-a") -> dict:
    """One run's archived evidence: the same score on every set, two answers per task."""
    record = {"scores": dict.fromkeys(SETS, score), "average": score, "optimizer_steps": 10,
              "train_wall_s": 1.0, "end_to_end_s": 2.0}  # fmt: skip
    heldout = {s: {"brainstorming": [score, score + 2], "task001": [score - 2]} for s in ("sinst_test", "dolly_test")}
    return {"inputs": inputs, "record": record, "heldout_by_task": heldout, "trained_rows_by_task": trained}


def archive(scores: dict[str, list[float]]) -> dict:
    runs = {}
    for variant, per_seed in scores.items():
        for seed, score in enumerate(per_seed):
            trained = dict(TASKS) if variant == "kd" else {"brainstorming": 2, "task001": seed}
            runs[f"{variant}-seed{seed}"] = evidence(score, trained)
            if variant == "srd_clusters":
                runs[f"{variant}-seed{seed}"]["cluster_ari"] = {"ari": 0.3 + seed / 10, "ari_chance": 0.0}
    reference = {"teacher": dict.fromkeys(SETS, 20.0), "student_before": dict.fromkeys(SETS, 5.0)}
    return {"experiment": "real", "runs": runs, "reference": reference, "training_rows_per_task": TASKS}


@pytest.fixture
def saved(monkeypatch) -> dict:
    out: dict = {}
    monkeypatch.setattr(
        srd_evidence, "save_results", lambda name, results, table: out.update(results=results, table=table)
    )
    return out


def test_the_tables_come_from_the_archive_over_the_seeds_with_every_variant(saved):
    scores = {v: [10.0, 12.0] for v in srd_evidence.VARIANTS["real"]}
    scores["srd_strat"] = [11.0, 12.0]
    data = archive(scores)
    del data["runs"]["srd_clusters-seed1"]  # seed 1 unfinished: only seed 0 is compared
    srd_evidence.write_results("real", data, [0, 1])
    results, table = saved["results"], saved["table"]
    assert results["seeds"] == [0]
    difference = next(d for d in results["differences"] if (d["variant"], d["baseline"]) == ("srd_strat", "kd"))
    assert difference["difference"]["average"] == (1.0, 0.0)
    assert "1 of the protocol's 5 training seeds" in table
    assert results["cluster_agreement"]["ari"] == [0.3]
    per_task = results["by_task"]["sinst_test"]["srd_strat"]
    assert per_task == {"heldout_rouge_l": {"brainstorming": 12.0, "task001": 9.0},
                        "trained_rows": {"brainstorming": 2.0, "task001": 0.0}}  # fmt: skip
    assert results["by_task"]["sinst_test"]["kd"]["trained_rows"] == {"brainstorming": 3.0, "task001": 1.0}
    assert "builds of the training rows" not in table


def test_seeds_from_different_builds_of_the_models_are_flagged_and_a_mixed_seed_is_left_out(saved):
    data = archive({v: [10.0, 11.0, 12.0] for v in srd_evidence.VARIANTS["real"]})
    for variant in srd_evidence.VARIANTS["real"]:
        data["runs"][f"{variant}-seed1"]["inputs"] = "build-b"
    data["runs"]["kd-seed2"]["inputs"] = "build-b"  # seed 2 pairs runs of two builds: not comparable
    srd_evidence.write_results("real", data, [0, 1, 2])
    assert saved["results"]["seeds"] == [0, 1]
    assert "**The runs come from 2 builds of the training rows, teacher and student**" in saved["table"]


def test_an_unfinished_seed_from_another_build_is_run_again_and_a_finished_one_is_kept(tmp_path, monkeypatch):
    variants = ["kd", "srd"]
    data = archive({"kd": [10.0, 11.0], "srd": [10.0]})  # seed 0 finished, seed 1 has only kd: both build-a
    path = tmp_path / "real_runs.json"
    monkeypatch.setattr(srd_evidence, "archive_path", lambda experiment: path)
    srd_evidence.write_archive("real", data)
    ran = []

    def run_and_archive(experiment, work, settings, base, seeds):
        runs = srd_evidence.read_archive(experiment)
        runs["runs"][ran[-1]] = evidence(1.0, {}, inputs="build-b")
        srd_evidence.write_archive(experiment, runs)

    monkeypatch.setattr(srd_evidence, "inputs_fingerprint", lambda settings, work: "build-b")
    monkeypatch.setattr(srd_evidence, "variant_spec", lambda *a: {"run": {"name": f"{a[4]}-seed{a[5]}"}})
    monkeypatch.setattr(srd_evidence, "write_spec", lambda spec, work: spec["run"]["name"])
    monkeypatch.setattr(srd_evidence, "srd", lambda command, name: ran.append(name))
    monkeypatch.setattr(srd_evidence, "archive_finished_runs", run_and_archive)
    todo = [s for s in (0, 1) if not srd_evidence.finished_seed(data, variants, s)]
    srd_evidence.run_protocol("real", tmp_path, {}, {}, todo, variants)
    assert todo == [1] and ran == ["kd-seed1", "srd-seed1"]
    runs = srd_evidence.read_archive("real")["runs"]
    assert {name: run["inputs"] for name, run in runs.items()} == {
        "kd-seed0": "build-a", "srd-seed0": "build-a", "kd-seed1": "build-b", "srd-seed1": "build-b",
    }  # fmt: skip


def test_an_archive_without_a_whole_seed_says_so():
    data = archive({"kd": [10.0]})
    with pytest.raises(SystemExit, match="no training seed has every variant"):
        srd_evidence.write_results("real", data, [0])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def finished_run(run: Path, buckets: list[list[str]] | None, predictions: list[dict], cluster_of=None) -> None:
    """A run directory as the pipeline leaves it: run.json, the predictions and (SRD) the rank buckets."""
    stages = {
        "reflect": {"status": "complete", "wall_s": 1.0},
        "rank": {"status": "complete", "wall_s": 0.5},
        "distill": {"status": "complete", "wall_s": 10.0,
                    "summary": {"train_wall_s": 9.0, "optimizer_steps": 7, "tokens_seen": 100}},
        "evaluate": {"status": "complete", "summary": {"student_after": {"sinst_test": {"rouge_l": 20.0}}}},
    }  # fmt: skip
    write_jsonl(run / "run.json", []).write_text(json.dumps({"stages": stages}))
    (run / "evaluate/student_after").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(predictions), run / "evaluate/student_after/predictions.parquet")
    for bucket, ids in enumerate(buckets or []):
        rows = {"example_id": ids, "bucket": [bucket] * len(ids)}
        if cluster_of:
            rows["cluster"] = [cluster_of[i] for i in ids]
        (run / f"rank/bucket={bucket}").mkdir(parents=True)
        pq.write_table(pa.table(rows), run / f"rank/bucket={bucket}/part-0.parquet")
    if buckets:
        manifest = {"buckets": [{"bucket": b} for b in range(len(buckets))]}
        (run / "rank/manifest.json").write_text(json.dumps(manifest))


def test_finished_run_directories_are_archived_once_with_what_the_tables_need(tmp_path, monkeypatch):
    from srd_ray.data import load_training_data
    from srd_ray.spec import DataSpec

    work = tmp_path / "work"
    topics = ["brainstorming", "brainstorming", "task001", "task001"]
    train = write_jsonl(work / "split/train.jsonl", [
        {"topic": t, "prompt": f"question {i}", "output": f"answer {i}"} for i, t in enumerate(topics)
    ])  # fmt: skip
    write_jsonl(work / "split/sinst_test.jsonl", [{"topic": "task001", "prompt": "p1"}])
    write_jsonl(work / "split/dolly_test.jsonl", [{"topic": "brainstorming", "prompt": "p2"}])
    ids = load_training_data(DataSpec.model_validate({"train": {"path": str(train)}})).table["example_id"].to_pylist()
    predictions = [{"eval_set": "sinst_test", "prompt": "p1", "rouge_l": 30.0},
                   {"eval_set": "dolly_test", "prompt": "p2", "rouge_l": 10.0}]  # fmt: skip
    finished_run(work / "kd-seed0", None, predictions)
    finished_run(work / "srd-seed0", [[ids[0]], [ids[2]], [ids[3]], [ids[1]]], predictions)
    clusters = dict(zip(ids, [0, 0, 1, 1], strict=True))  # exactly the topics
    finished_run(work / "srd_clusters-seed0", [[ids[0]], [ids[2]], [ids[3]], [ids[1]]], predictions, clusters)
    for label in ("teacher", "student_before"):
        write_jsonl(work / f"base/evaluate/{label}/summary.json", []).write_text(
            json.dumps({"sets": {"sinst_test": {"rouge_l": 5.0}}})
        )
    models = {}
    for role in ("teacher", "student"):
        (tmp_path / role).mkdir()
        (tmp_path / role / "model.safetensors").write_bytes(role.encode())
        models[role] = str(tmp_path / role)
    settings = {"train_file": str(train), "teacher_sft": None, "models": models}
    base = {"data": {"train": {"path": str(train)}}}
    monkeypatch.setattr(srd_evidence, "archive_path", lambda experiment: tmp_path / f"{experiment}_runs.json")

    archive = srd_evidence.archive_finished_runs("real", work, settings, base, [0])
    assert sorted(archive["runs"]) == ["kd-seed0", "srd-seed0", "srd_clusters-seed0"]
    assert archive["training_rows_per_task"] == {"brainstorming": 2, "task001": 2}
    assert archive["reference"]["teacher"] == {"sinst_test": 5.0}
    kd, srd, clustered = (archive["runs"][name] for name in ("kd-seed0", "srd-seed0", "srd_clusters-seed0"))
    assert kd["trained_rows_by_task"] == {"brainstorming": 2, "task001": 2}
    assert srd["trained_rows_by_task"] == {"brainstorming": 1, "task001": 2}  # bucket 3 (ids[1]) dropped
    assert srd["heldout_by_task"] == {"sinst_test": {"task001": [30.0]}, "dolly_test": {"brainstorming": [10.0]}}
    assert srd["record"]["optimizer_steps"] == 7 and srd["record"]["average"] == 20.0
    assert clustered["cluster_ari"]["ari"] == 1.0
    assert len({run["inputs"] for run in archive["runs"].values()}) == 1
    assert json.loads((tmp_path / "real_runs.json").read_text()) == archive

    # Archived runs are not read again: their directories can be gone (a new session, a fresh machine).
    for name in archive["runs"]:
        shutil.rmtree(work / name)
    assert srd_evidence.archive_finished_runs("real", work, settings, base, [0]) == archive


def variant_specs(work: Path, seed: int, *variants: str) -> list[dict]:
    """The specs the script writes for ``variants`` of the real split, on a minimal base spec."""
    base = {"run": {}, "models": {"teacher": {"path": "teacher"}, "student": {"path": "student"}},
            "data": {"train": {"path": "train.jsonl"}}, "rank": {}, "evaluate": {}}  # fmt: skip
    settings = {"teacher_sft": None, "models": {"teacher": "teacher"}, "distill": {"batch_size": 8, "lr": 1e-4},
                "kd_epochs": [2, 2, 1], "srd_epochs": [2, 2, 2]}  # fmt: skip
    return [srd_evidence.variant_spec(base, settings, work, "real", variant, seed) for variant in variants]


def test_the_compute_matched_kd_trains_every_row_for_srds_budget(tmp_path):
    """kd_short: KD's spec (every row, no curriculum, the same stage settings) with 1 + 1 + 1 epochs, the
    0.6x of KD's steps that SRD trains for."""
    kd, short = variant_specs(tmp_path, 3, "kd", "kd_short")
    assert short["run"]["name"] == "kd_short-seed3" and short["distill"]["curriculum"] == "none"
    assert [stage.pop("epochs") for stage in short["distill"]["stages"]] == [1, 1, 1]
    assert [stage.pop("epochs") for stage in kd["distill"]["stages"]] == [2, 2, 1]
    assert short["distill"] == kd["distill"] and short["rank"] == kd["rank"]
    assert srd_evidence.trained_ids(tmp_path / "kd_short-seed3", "kd_short") is None  # every row


def test_kd_srd_and_srd_strat_are_also_tabled_over_every_seed_that_ran_all_three(saved):
    """A seed whose other variants were lost (a fresh machine cannot rebuild the same inputs) still counts
    for the headline comparison, in a table of its own; the protocol's tables keep to whole seeds."""
    data = archive({v: [10.0, 12.0, 14.0] for v in srd_evidence.VARIANTS["real"]})
    data["runs"]["srd_strat-seed2"]["record"]["average"] = 15.0
    for variant in ("srd_strat_refresh", "srd_clusters"):
        del data["runs"][f"{variant}-seed2"]
    srd_evidence.write_results("real", data, [0, 1, 2])
    results, table = saved["results"], saved["table"]
    assert results["seeds"] == [0, 1]
    [core] = results["sections"]
    assert core["seeds"] == [0, 1, 2] and list(core["runs"]) == ["kd", "srd", "srd_strat"]
    pairs = {(d["variant"], d["baseline"]): d["difference"]["average"] for d in core["differences"]}
    assert pairs.keys() == {("srd", "kd"), ("srd_strat", "kd"), ("srd_strat", "srd")}
    assert pairs["srd_strat", "kd"] == pytest.approx((1 / 3, (1 / 3) ** 0.5))
    assert "2 of the protocol's 5 training seeds finished (3 ran kd, srd and srd_strat" in table
    assert "\n## kd, srd, srd_strat over every training seed that ran them all: [0, 1, 2]" in table


def test_no_extra_table_when_every_seed_is_whole(saved):
    srd_evidence.write_results("real", archive({v: [10.0, 12.0] for v in srd_evidence.VARIANTS["real"]}), [0, 1])
    assert saved["results"]["sections"] == [] and "ran them all" not in saved["table"]


def test_a_post_hoc_variant_on_seeds_of_its_own_gets_a_table_of_its_own(saved):
    data = archive({v: [10.0, 12.0] for v in srd_evidence.VARIANTS["real"]})
    later = archive({"kd": [0, 0, 20.0], "srd_strat": [0, 0, 18.0], "srd_strat_long": [0, 0, 21.0]})
    data["runs"].update({k: v for k, v in later["runs"].items() if k.endswith("seed2")})
    for run in ("kd-seed2", "srd_strat-seed2", "srd_strat_long-seed2"):
        data["runs"][run]["inputs"] = "build-b"  # a later machine's build
    srd_evidence.write_results("real", data, [0, 1, 2])
    results = saved["results"]
    assert results["seeds"] == [0, 1] and "srd_strat_long" not in results["runs"]
    [long] = results["sections"]
    assert long["seeds"] == [2] and list(long["runs"]) == ["kd", "srd_strat", "srd_strat_long"]
    pairs = {(d["variant"], d["baseline"]): d["difference"]["average"][0] for d in long["differences"]}
    assert pairs == {("srd_strat", "kd"): -2.0, ("srd_strat_long", "kd"): 1.0, ("srd_strat_long", "srd_strat"): 3.0}
    assert long["inputs"] == ["build-b"] and "teacher and student (per run, as archived): ['build-b']" in saved["table"]


def test_the_long_variant_adds_a_stage_on_every_row(tmp_path):
    strat, long = variant_specs(tmp_path, 5, "srd_strat", "srd_strat_long")
    assert long["rank"] == {**strat["rank"], "keep_buckets": 4} and long["rank"]["stratify_by"] == "topic"
    assert long["distill"]["stages"][:3] == strat["distill"]["stages"]
    assert long["distill"]["stages"][3] == {**strat["distill"]["stages"][2], "epochs": 1}
