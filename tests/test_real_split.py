"""The real-data train/test split (bench/real_split.py, #17 b): no example is both trained and evaluated on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_split", ROOT / "bench" / "real_split.py")
real_split = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_split)


def written(paths: dict[str, Path]) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def task_of(row: dict) -> tuple[str, str]:
    return normalised(row["instruction"]), normalised(row.get("input") or "")


def assert_disjoint(files: dict[str, list[dict]]) -> None:
    """Independently of ``example_key``: no training prompt, and no (instruction, input), is in a test set."""
    train = files["train"]
    tested = [row for name, rows in files.items() if name != "train" for row in rows]
    tested_prompts = {normalised(row["prompt"]) for row in tested}
    tested_tasks = {task_of(row) for row in tested}
    for row in train:
        assert normalised(row["prompt"]) not in tested_prompts, row["prompt"][:80]
        assert task_of(row) not in tested_tasks, row["prompt"][:80]
    assert len({normalised(row["prompt"]) for row in train}) == len(train), "a training example repeats"


@pytest.mark.skipif(not real_split.SHARED_EVAL.exists(), reason="../shared/data/eval is not beside the checkout")
def test_the_real_split_keeps_training_and_test_examples_apart(tmp_path):
    files = written(real_split.write_split(tmp_path))
    sizes = {name: len(rows) for name, rows in files.items()}
    # 80 % of Dolly (500) and S-NI (1694) are training candidates; one Dolly prompt occurs twice.
    assert sizes == {"train": 1754, "dolly_test": 100, "sinst_test": 339, "self-inst": 242, "vicuna": 80}
    assert_disjoint(files)
    again = written(real_split.write_split(tmp_path / "again"))["train"]  # the split is deterministic
    assert [row["prompt"] for row in again] == [
        row["prompt"] for row in written(real_split.write_split(tmp_path))["train"]
    ]


def test_collisions_and_repeats_are_left_out_of_training(tmp_path):
    def row(instruction: str, output="an answer") -> dict:
        prompt = f"### Instruction:\n{instruction}\n\n### Response:\n"
        return {"prompt": prompt, "instruction": instruction, "input": "", "output": output}

    shared = tmp_path / "eval"
    shared.mkdir()
    dolly = [row(f"dolly question {i}") for i in range(20)] + [row("Shared QUESTION"), row("twice"), row("twice")]
    sets = {
        "dolly": dolly,
        "sinst": [row(f"sinst task {i}", output=["first", "second"]) for i in range(10)],
        "self-inst": [row("shared   question")],  # the same example as a Dolly row, up to case and spaces
        "vicuna": [row("vicuna question")],
    }
    for name, rows in sets.items():
        (shared / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = written(real_split.write_split(tmp_path / "split", shared))
    train_prompts = [normalised(r["prompt"]) for r in files["train"]]
    assert normalised(row("Shared QUESTION")["prompt"]) not in train_prompts
    assert train_prompts.count(normalised(row("twice")["prompt"])) <= 1
    assert_disjoint(files)
