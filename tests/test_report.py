"""srd compare and baseline discovery on hand-made run manifests (no Ray, no models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from srd_ray.errors import RunDirError
from srd_ray.report import compare_runs, find_baselines, teacher_signal_section


def fake_run(root: Path, name: str, curriculum: str, rouge: dict[str, float], wall: float, steps: int) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    sets = {
        s: {"rouge_l": v, "rouge_l_std": 0.1, "exact_match": 0.0, "seeds": [10], "examples": 5}
        for s, v in rouge.items()
    }
    manifest = {
        "run": name,
        "stages": {
            "distill": {"status": "complete", "summary": {"curriculum": curriculum, "train_wall_s": wall,
                                                          "optimizer_steps": steps, "tokens_seen": steps * 100}},
            "evaluate": {"status": "complete", "summary": {"student_after": sets}},
        },
    }  # fmt: skip
    (run_dir / "run.json").write_text(json.dumps(manifest))
    return run_dir


def test_compare_lists_scores_costs_and_ratios(tmp_path):
    kd = fake_run(tmp_path, "kd", "none", {"dolly": 20.0, "vicuna": 10.0}, wall=100.0, steps=200)
    srd = fake_run(tmp_path, "srd", "srd", {"dolly": 22.0, "vicuna": 11.0}, wall=60.0, steps=120)
    table = compare_runs([kd, srd]).splitlines()
    assert table[0] == "| run | curriculum | dolly | vicuna | average | train_wall_s | optimizer_steps | tokens_seen |"
    assert table[2] == "| kd | none | 20.00 | 10.00 | 15.00 | 100.00 | 200 | 20000 |"
    assert table[4] == "| srd / kd | ratio | 1.10x | 1.10x | 1.10x | 0.60x | 0.60x | 0.60x |"


def test_baselines_are_finished_curriculum_none_runs_beside_the_run(tmp_path):
    srd = fake_run(tmp_path, "srd", "srd", {"dolly": 22.0}, wall=60.0, steps=120)
    kd = fake_run(tmp_path, "kd", "none", {"dolly": 20.0}, wall=100.0, steps=200)
    fake_run(tmp_path, "other-srd", "srd", {"dolly": 21.0}, wall=60.0, steps=120)
    assert [str(run) for run in find_baselines(srd)] == [str(kd)]


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="not an srd-ray run directory"):
        compare_runs([tmp_path])


def test_the_report_says_how_many_ids_an_adaptive_signal_kept():
    adaptive = {"k": "adaptive", "coverage": 0.99, "max_k": 1024, "ids_per_token": 37.25}
    summary = {**adaptive, "logprob_dtype": "float16", "rows": 10, "response_tokens": 200, "stored_bytes": 2**20,
               "tail_mass": {"1": 0.004, "2": 0.01}}  # fmt: skip
    html = teacher_signal_section({"teacher_signal": "topk"}, {"summary": summary, "wall_s": 3.0})
    assert "<td>adaptive: 99% of the mass, at most 1024 (37.25 ids per token)</td>" in html
    assert "T 2: 1.0%" in html
