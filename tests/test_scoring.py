"""ROUGE-L / exact-match scoring and the seed averaging of the evaluation protocol."""

from __future__ import annotations

import pyarrow as pa
import pytest

from srd_ray.evaluate import expand_seeds, score_predictions, summarize
from srd_ray.scoring import exact_match, rouge_l


def test_rouge_l_hand_checked():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4 tokens
    value = rouge_l("the cat lay on a mat", ["the cat sat on the mat"])
    precision, recall = 4 / 6, 4 / 6
    assert value == pytest.approx(2 * precision * recall / (precision + recall))
    assert rouge_l("Running dogs", ["runs dog"]) == pytest.approx(1.0)  # stemmed


def test_rouge_l_best_over_references_and_empty_prediction():
    assert rouge_l("blue sky", ["red car", "blue sky today"]) == pytest.approx(0.8)
    assert rouge_l("", ["anything"]) == 0.0


def test_exact_match_normalises_case_punctuation_articles():
    assert exact_match("The Answer!", ["answer"]) == 1.0
    assert exact_match("an answer", ["other", "Answer."]) == 1.0
    assert exact_match("answers", ["answer"]) == 0.0
    assert exact_match("", ["answer"]) == 0.0


def test_seed_averaging_mean_and_std_over_seed_means():
    predictions = pa.table(
        {
            "eval_set": ["a"] * 4 + ["b"] * 2,
            "seed": [10, 10, 20, 20, 10, 20],
            "example_id": ["x", "y", "x", "y", "z", "z"],
            "prediction": ["red car", "", "red car", "red car", "yes", "no"],
            "references": [["red car"], ["blue"], ["red car"], ["red car"], ["yes"], ["yes"]],
        }
    )
    summary = summarize(score_predictions(predictions))
    # set a: seed 10 -> mean(100, 0) = 50; seed 20 -> mean(100, 100) = 100
    assert summary["a"]["rouge_l"] == pytest.approx(75.0)
    assert summary["a"]["rouge_l_std"] == pytest.approx(25.0)
    assert summary["a"]["exact_match"] == pytest.approx(75.0)
    assert summary["a"]["seeds"] == [10, 20] and summary["a"]["examples"] == 2
    assert summary["b"]["rouge_l"] == pytest.approx(50.0)


def test_expand_seeds_makes_one_row_per_set_seed_example():
    table = pa.table(
        {"example_id": ["b", "a"], "input_position": [1, 0], "prompt": ["p1", "p0"], "references": [["r1"], ["r0"]]}
    )
    work = expand_seeds({"s": table}, [10, 20], max_examples=1)
    assert work.num_rows == 2
    assert work["example_id"].to_pylist() == ["a", "a"]  # first by input position
    assert work["seed"].to_pylist() == [10, 20]
