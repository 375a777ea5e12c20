"""The exact SRD ranking (reciprocal rank fusion) on hand-checked tables, ties included."""

from __future__ import annotations

import pyarrow as pa
import pytest

from srd_ray.errors import DataError
from srd_ray.rank import rank_rows
from srd_ray.spec import RankSpec


def scored(rouge, ce, positions=None):
    n = len(rouge)
    return pa.table(
        {
            "example_id": [f"e{i}" for i in range(n)],
            "input_position": positions if positions is not None else list(range(n)),
            "rouge_l": rouge,
            "student_ce": ce,
        }
    )


def test_hand_checked_example_with_ties():
    # Input order e0..e5. ROUGE ties: e1=e3=0.5, e4=e5=0.0. CE ties: e0=e2=1.0.
    table = scored([0.2, 0.5, 0.9, 0.5, 0.0, 0.0], [1.0, 2.0, 1.0, 0.5, 3.0, 0.1])
    ranked = rank_rows(table, RankSpec(k=60, num_buckets=2, keep_buckets=1))
    by_id = {row["example_id"]: row for row in ranked.to_pylist()}
    # rank_rouge: stable sort by ROUGE desc -> e2, e1, e3, e0, e4, e5
    assert [by_id[f"e{i}"]["rank_rouge"] for i in range(6)] == [4, 2, 1, 3, 5, 6]
    # rank_ce: stable sort OF THAT LIST by CE asc -> e5(0.1), e3(0.5), e2(1.0), e0(1.0), e1(2.0), e4(3.0)
    # (the CE tie e2/e0 is broken by ROUGE order: e2 before e0)
    assert [by_id[f"e{i}"]["rank_ce"] for i in range(6)] == [4, 5, 3, 2, 6, 1]
    # rrf = 1/(60+rank_rouge) + 1/(60+rank_ce), computed by hand from the two rank lists above.
    expected_rrf = {
        i: 1 / (60 + rr) + 1 / (60 + rc) for i, (rr, rc) in enumerate([(4, 4), (2, 5), (1, 3), (3, 2), (5, 6), (6, 1)])
    }
    for i in range(6):
        assert by_id[f"e{i}"]["rrf_score"] == pytest.approx(expected_rrf[i], abs=0)
    # Sorted by rrf desc: e2 (1,3), e3 (3,2), e5 (6,1), e1 (2,5), e0 (4,4), e4 (5,6).
    assert ranked["example_id"].to_pylist() == ["e2", "e3", "e5", "e1", "e0", "e4"]
    assert ranked["difficulty_rank"].to_pylist() == [1, 2, 3, 4, 5, 6]
    assert ranked["bucket"].to_pylist() == [0, 0, 0, 1, 1, 1]


def test_fused_score_ties_keep_the_ce_sorted_order():
    # Two rows with swapped ranks (1,2) and (2,1) have exactly equal RRF scores.
    table = scored([0.9, 0.8], [0.2, 0.1])  # rank_rouge: e0=1, e1=2; rank_ce: e1=1, e0=2
    ranked = rank_rows(table, RankSpec(num_buckets=1, keep_buckets=1))
    assert ranked["rrf_score"][0].as_py() == ranked["rrf_score"][1].as_py()
    # Tie broken by the CE-sorted list, where e1 (lower CE) comes first.
    assert ranked["example_id"].to_pylist() == ["e1", "e0"]


def test_last_bucket_takes_the_remainder():
    ranked = rank_rows(scored([i / 10 for i in range(10)], [1.0] * 10), RankSpec(num_buckets=4, keep_buckets=3))
    assert [ranked["bucket"].to_pylist().count(b) for b in range(4)] == [2, 2, 2, 4]


def test_result_depends_on_input_position_not_row_order():
    rouge, ce = [0.0, 0.0, 0.5, 0.0, 0.5], [1.0, 1.0, 2.0, 1.0, 2.0]
    table = scored(rouge, ce)
    shuffled = table.take([3, 0, 4, 2, 1])
    spec = RankSpec(num_buckets=2, keep_buckets=1)
    assert rank_rows(table, spec).to_pylist() == rank_rows(shuffled, spec).to_pylist()


@pytest.mark.parametrize(
    ("table", "spec", "expected"),
    [
        (
            scored([0.1, float("nan")], [1.0, 1.0]),
            RankSpec(num_buckets=1, keep_buckets=1),
            "column rouge_l has 1 NaN/infinite value(s), first at example_id 'e1'",
        ),
        (
            scored([0.1, 0.2], [1.0, float("inf")]),
            RankSpec(num_buckets=1, keep_buckets=1),
            "column student_ce has 1 NaN/infinite value(s)",
        ),
        (scored([0.1, 0.2], [1.0, 1.0]), RankSpec(num_buckets=3, keep_buckets=1), "2 rows cannot fill"),
        (scored([0.1], [1.0]).drop_columns(["student_ce"]), RankSpec(num_buckets=1, keep_buckets=1), "student_ce"),
        (
            pa.table(
                {"example_id": ["a", "a"], "input_position": [0, 1], "rouge_l": [0.1, 0.2], "student_ce": [1.0, 2.0]}
            ),
            RankSpec(num_buckets=1, keep_buckets=1),
            "duplicate example_id 'a'",
        ),
    ],
)
def test_bad_scores_are_clear_errors(table, spec, expected):
    with pytest.raises(DataError) as caught:
        rank_rows(table, spec)
    assert expected in str(caught.value)
