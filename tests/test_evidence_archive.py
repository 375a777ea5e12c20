"""The evidence script's run archive (bench/srd_evidence.py, #27): the tables are made from the committed
per-run evidence alone, so seeds finished in different sessions, on fresh machines, add up."""

from __future__ import annotations

import sys
from pathlib import Path

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


def test_runs_from_different_builds_of_the_models_are_flagged(saved):
    data = archive({v: [10.0, 11.0] for v in srd_evidence.VARIANTS["real"]})
    data["runs"]["kd-seed1"]["inputs"] = "build-b"
    srd_evidence.write_results("real", data, [0, 1])
    assert saved["results"]["seeds"] == [0, 1]
    assert "**The runs come from 2 builds of the training rows, teacher and student**" in saved["table"]


def test_an_archive_without_a_whole_seed_says_so():
    data = archive({"kd": [10.0]})
    with pytest.raises(SystemExit, match="no training seed has every variant"):
        srd_evidence.write_results("real", data, [0])
