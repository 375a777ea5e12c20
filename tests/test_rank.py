"""The exact SRD ranking (reciprocal rank fusion) on hand-checked tables, ties included."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from srd_ray.errors import DataError
from srd_ray.rank import rank_rows, run_rank
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


def test_hard_to_easy_and_random_orders_are_ablations_of_the_same_ranking():
    table = scored([i / 10 for i in range(8)], [1.0 - i / 10 for i in range(8)])
    easy = rank_rows(table, RankSpec(num_buckets=2, keep_buckets=1))
    hard = rank_rows(table, RankSpec(num_buckets=2, keep_buckets=1, order="hard_to_easy"))
    assert hard["example_id"].to_pylist() == easy["example_id"].to_pylist()[::-1]
    assert hard["bucket"].to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert hard["difficulty_rank"].to_pylist() == [8, 7, 6, 5, 4, 3, 2, 1]  # still easy → hard ranks
    random_a = rank_rows(table, RankSpec(num_buckets=2, keep_buckets=1, order="random"), seed=3)
    random_b = rank_rows(table, RankSpec(num_buckets=2, keep_buckets=1, order="random"), seed=3)
    assert random_a.to_pylist() == random_b.to_pylist()
    assert sorted(random_a["example_id"].to_pylist()) == sorted(easy["example_id"].to_pylist())


def test_custom_signals_and_direction():
    table = scored([0.0] * 4, [0.4, 0.3, 0.2, 0.1]).append_column("teacher_ce", pa.array([0.1, 0.2, 0.3, 0.4]))
    spec = RankSpec(signals=[{"name": "teacher_ce", "easier_when": "lower"}], num_buckets=1, keep_buckets=1)
    ranked = rank_rows(table, spec)
    assert ranked["example_id"].to_pylist() == ["e0", "e1", "e2", "e3"]
    assert ranked["rank_teacher_ce"].to_pylist() == [1, 2, 3, 4] and "rank_ce" not in ranked.column_names
    with pytest.raises(DataError, match=r"lack column\(s\) \['teacher_ce'\]"):
        rank_rows(table.drop_columns(["teacher_ce"]), spec)


def test_ranking_is_independent_of_shards_and_their_arrival_order():
    """Reflect writes shards in whatever order actors finish; rank must not care."""
    from srd_ray.shards import split_into_shards

    n = 103
    rouge = [round((i * 37 % 11) / 10, 1) for i in range(n)]  # many ties, zeros included
    ce = [round((i * 53 % 17) / 4, 2) for i in range(n)]
    table = scored(rouge, ce)
    spec = RankSpec()
    reference = rank_rows(table, spec).to_pylist()
    for shard_rows, arrival in ((10, [3, 0, 10, 7, 1, 2, 4, 5, 6, 8, 9]), (50, [2, 1, 0]), (103, [0])):
        shards = [s.drop_columns(["shard_index"]) for s in split_into_shards(table, shard_rows)]
        arrived = pa.concat_tables([shards[i] for i in arrival])
        assert rank_rows(arrived, spec).to_pylist() == reference


@pytest.mark.parametrize("order", ["easy_to_hard", "hard_to_easy", "random"])
@pytest.mark.parametrize("stratify_by", [None, "task"])
def test_the_written_buckets_are_the_ranked_rows_in_every_order(tmp_path, order, stratify_by):
    """The rank stage copies the rows one bucket at a time (never the whole ranked table): each written
    bucket is exactly the ranked table's rows of that bucket, in curriculum order, text and all."""
    n = 37
    table = scored([(i * 7 % 5) / 4 for i in range(n)], [float(i * 3 % 11) for i in range(n)])
    table = table.append_column("task", pa.array([f"t{i % 3}" for i in range(n)]))
    table = table.append_column("prompt", pa.array([f"prompt {i}" for i in range(n)]))
    spec = RankSpec(order=order, stratify_by=stratify_by)
    ranked = rank_rows(table, spec, seed=1)
    summary = run_rank(spec, table.take(list(range(n))[::-1]), tmp_path / "rank", seed=1, task_column="task")
    for b in range(4):
        written = pq.read_table(tmp_path / "rank" / f"bucket={b}" / "part-00000.parquet")
        assert written.to_pylist() == ranked.filter(pa.compute.equal(ranked["bucket"], b)).to_pylist()
        assert summary["buckets"][b]["rows"] == written.num_rows


def test_distillation_takes_the_buckets_rows_from_the_training_data(tmp_path):
    """The driver reads only the ids of each bucket and takes the text from the training rows it holds: the
    same rows, in the same (curriculum) order, as the bucket's own text; a row the data lacks is named."""
    from types import SimpleNamespace

    from srd_ray.distill_stage import bucket_tables, read_training_text, training_rows
    from srd_ray.rank import bucket_dir
    from srd_ray.storage import Location

    n = 23
    table = scored([(i * 7 % 5) / 4 for i in range(n)], [float(i * 3 % 11) for i in range(n)])
    table = table.append_column("prompt", pa.array([f"prompt {i}" for i in range(n)]))
    table = table.append_column("response", pa.array([f"response {i}" for i in range(n)]))
    run_rank(RankSpec(), table, tmp_path / "rank")
    rank_dir = Location.of(tmp_path / "rank")
    buckets = bucket_tables(rank_dir, range(4), table)
    for b in range(4):
        assert buckets[b].to_pylist() == read_training_text(bucket_dir(rank_dir, b)).to_pylist()
    spec = SimpleNamespace(rank=RankSpec(keep_buckets=3))
    kept = training_rows(spec, rank_dir, table)
    dropped = set(buckets[3]["example_id"].to_pylist())
    in_input_order = [i for i in table["example_id"].to_pylist() if i not in dropped]
    assert kept["example_id"].to_pylist() == in_input_order, "the kept rows, in input order"
    with pytest.raises(
        DataError, match=r"rank bucket \d: example_id 'e\d+' is not in the training data; rerun with --redo rank"
    ):
        bucket_tables(rank_dir, range(4), table.slice(1))
