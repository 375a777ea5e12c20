"""Stratified ranking (rank.stratify_by / stratify_clusters): the per-stratum bucket rule on hand-built
tables, its reduction to the release's global ranking, the stratified refresh, the warning when a global
ranking drops a task, the clusters, and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from srd_ray.errors import DataError
from srd_ray.rank import bucket_quotas, rank_rows, refresh_rows, refresh_summary, run_rank, stratum_buckets
from srd_ray.spec import RankSpec
from srd_ray.strata import (
    check_stratification,
    cluster_prompts,
    drop_warnings,
    group_summary,
    resolve_strata,
    task_column,
)

SIZES = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 100}


def strata_table(sizes: dict[str, int], seed: int = 0) -> pa.Table:
    """Rows of several strata, interleaved in input order, with tie-prone signals."""
    rng = np.random.default_rng(seed)
    tasks = [task for task, n in sizes.items() for _ in range(n)]
    order = rng.permutation(len(tasks))
    n = len(tasks)
    return pa.table(
        {
            "example_id": [f"r{i}" for i in range(n)],
            "input_position": list(range(n)),
            "task": [tasks[i] for i in order],
            "rouge_l": np.round(rng.random(n), 1),  # one decimal: many ties
            "student_ce": np.round(rng.random(n) * 3, 1),
        }
    )


def per_stratum(ranked: pa.Table, task: str) -> pa.Table:
    return ranked.filter(pc.equal(ranked["task"], task))


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, [0]), (2, [0, 2]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (5, [0, 0, 1, 2, 3]), (8, [0, 0, 1, 1, 2, 2, 3, 3])],
)
def test_the_bucket_rule_splits_a_stratum_into_near_equal_parts(n, expected):
    assert stratum_buckets(n, 4).tolist() == expected


@pytest.mark.parametrize("order", ["easy_to_hard", "hard_to_easy", "random"])
def test_every_stratum_is_ranked_alone_and_cut_by_the_rule(order):
    table = strata_table(SIZES)
    spec = RankSpec(stratify_by="task", order=order)
    ranked = rank_rows(table, spec, seed=7)
    assert sorted(ranked["example_id"].to_pylist()) == sorted(table["example_id"].to_pylist())
    for task, n in SIZES.items():
        rows = per_stratum(ranked, task)
        # Ranked on its own rows by the same algorithm: equal to a global ranking of the stratum alone.
        alone = rank_rows(per_stratum(table, task), RankSpec(order=order, num_buckets=1, keep_buckets=1), seed=0)
        by_id = dict(zip(alone["example_id"].to_pylist(), alone["difficulty_rank"].to_pylist(), strict=True))
        assert [by_id[i] for i in rows["example_id"].to_pylist()] == rows["difficulty_rank"].to_pylist()
        # Within the stratum, curriculum positions 1..n fall into floor(4 (r - 1) / n).
        assert rows["bucket"].to_pylist() == stratum_buckets(n, 4).tolist()
        if order != "random":  # the curriculum walks the stratum's ranking forwards or backwards
            forwards = list(range(1, n + 1))
            assert rows["difficulty_rank"].to_pylist() == (forwards if order == "easy_to_hard" else forwards[::-1])
    # The run's curriculum: every stratum's bucket 0, then bucket 1, ...
    assert ranked["bucket"].to_pylist() == sorted(ranked["bucket"].to_pylist())
    # A stratum smaller than num_buckets is never dropped whole; a 100-row stratum loses a quarter.
    groups = {g["value"]: g for g in group_summary(ranked, "task", 4, 3)}
    assert [groups[t]["dropped"] for t in SIZES] == [0, 0, 0, 1, 1, 25]


def test_random_order_is_seeded_and_stays_within_each_stratum():
    table = strata_table(SIZES)
    spec = RankSpec(stratify_by="task", order="random")
    first, again, other = (rank_rows(table, spec, seed=s) for s in (3, 3, 4))
    assert first.to_pylist() == again.to_pylist()
    assert first["example_id"].to_pylist() != other["example_id"].to_pylist()
    for task, n in SIZES.items():
        assert per_stratum(first, task)["bucket"].to_pylist() == stratum_buckets(n, 4).tolist()


def test_ties_within_a_stratum_keep_input_order():
    table = pa.table(
        {
            "example_id": ["x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3"],
            "input_position": list(range(8)),
            "task": ["x", "y"] * 4,
            "rouge_l": [0.5] * 8,
            "student_ce": [1.0] * 8,
        }
    )
    ranked = rank_rows(table, RankSpec(stratify_by="task"))
    # Buckets interleave the strata: bucket 0 = x0, y0; bucket 1 = x1, y1; ...
    assert ranked["example_id"].to_pylist() == ["x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3"]
    assert ranked["bucket"].to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("n", [12, 103])
def test_one_stratum_is_the_release_s_global_ranking(n):
    table = strata_table({"only": n}, seed=n)
    global_ = rank_rows(table, RankSpec())
    one = rank_rows(table, RankSpec(stratify_by="task"))
    columns = ["example_id", "rank_rouge", "rank_ce", "rrf_score", "difficulty_rank"]
    assert one.select(columns).to_pylist() == global_.select(columns).to_pylist()
    if n % 4 == 0:  # the release's last bucket takes the remainder; the per-stratum rule spreads it
        assert one["bucket"].to_pylist() == global_["bucket"].to_pylist()
    else:
        assert np.abs(np.array(one["bucket"]) - np.array(global_["bucket"])).max() <= 1


def test_refresh_admits_from_every_stratum_as_planned():
    table = strata_table({"easy": 8, "hard": 8, "small": 2})
    spec = RankSpec(stratify_by="task")
    initial = rank_rows(table, spec)
    quotas = bucket_quotas(initial, "task", 4)
    assert quotas == {"easy": [2, 2, 2, 2], "hard": [2, 2, 2, 2], "small": [1, 0, 1, 0]}
    admitted = initial.filter(pc.equal(initial["bucket"], 0))["example_id"]
    left = initial.filter(pc.invert(pc.is_in(initial["example_id"], admitted)))
    # The student now finds the rows the other way round within each task.
    rescored = left.select(["example_id", "input_position", "task"]).append_column(
        "rouge_l", pa.array(1.0 - left["rouge_l"].to_numpy())
    )
    rescored = rescored.append_column("student_ce", pa.array(3.0 - left["student_ce"].to_numpy()))
    refreshed = refresh_rows(rescored, spec, bucket=1, quotas=quotas)
    new = refreshed.filter(pc.equal(refreshed["bucket"], 1))
    assert sorted(new["task"].to_pylist()) == ["easy", "easy", "hard", "hard"]  # small's bucket 1 quota is 0
    for task in ("easy", "hard"):
        rows = per_stratum(refreshed, task)
        assert rows["bucket"].to_pylist() == [1, 1, 2, 2, 3, 3]
        assert rows["difficulty_rank"].to_pylist() == list(range(1, 7))
    summary = refresh_summary(refreshed, initial, 1, "task")
    counts = {g["value"]: g["admitted"] for g in summary["admitted_by_stratum"]["groups"]}
    assert counts == {"easy": 2, "hard": 2, "small": 0} and summary["admitted"] == 4
    assert summary["spearman_with_initial"] < 0  # the order reversed within the tasks


def test_quotas_without_strata_reproduce_the_release_refresh():
    table = strata_table({"only": 10})
    initial = rank_rows(table, RankSpec())
    assert bucket_quotas(initial, None, 4) == {None: [2, 2, 2, 4]}


def planted(drop_share: float) -> pa.Table:
    """Task 'hard' has by far the hardest rows on ``drop_share`` of its 20 rows (the others are the easiest of
    all); three other tasks in between."""
    rng = np.random.default_rng(0)
    tasks = ["hard"] * 20 + ["a"] * 20 + ["b"] * 20 + ["c"] * 20
    rouge = rng.uniform(0.5, 1.0, 80)
    ce = rng.uniform(0.0, 1.0, 80)
    worst = round(drop_share * 20)
    rouge[:worst], ce[:worst] = 0.0, 5.0
    rouge[worst:20], ce[worst:20] = 1.0, 0.0
    return pa.table(
        {"example_id": [f"r{i}" for i in range(80)], "input_position": list(range(80)), "task": tasks,
         "rouge_l": rouge, "student_ce": ce}
    )  # fmt: skip


def test_a_global_ranking_that_drops_most_of_a_task_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="srd_ray.rank"):
        summary = run_rank(RankSpec(stratify_by=None), planted(0.9), tmp_path / "rank", task_column="task")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "task 'hard'" in warnings[0] and "rank.stratify_by: task" in warnings[0]
    assert "18 of the 20 rows (90%)" in warnings[0]
    assert summary["most_dropped_tasks"][0]["value"] == "hard"
    tasks = {g["value"]: g for g in summary["tasks"]["groups"]}
    assert tasks["hard"]["dropped"] == 18 and sum(g["dropped"] for g in tasks.values()) == 20


@pytest.mark.parametrize(
    ("table", "spec", "column"),
    [
        (planted(0.3), RankSpec(stratify_by=None), "task"),  # the hard rows fit in the dropped bucket: 6 of 20
        (planted(0.9), RankSpec(stratify_by="task"), "task"),  # stratified: a quarter of every task
        (planted(0.9), RankSpec(), "task"),  # auto (the default): stratified by the data's task column
        (planted(0.9), RankSpec(), None),  # no task column in the data: auto ranks globally
    ],
)
def test_no_warning_otherwise(tmp_path, caplog, table, spec, column):
    with caplog.at_level(logging.WARNING, logger="srd_ray.rank"):
        summary = run_rank(spec, table, tmp_path / "rank", task_column=column)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert not summary.get("warnings")
    assert summary["stratify_by"] == column if spec.stratify_by else summary["stratify_by"] is None
    if summary["stratify_by"]:
        assert all(g["dropped"] == 5 for g in summary["strata"]["groups"])


def test_drop_warnings_list_the_worst_first():
    groups = group_summary(
        rank_rows(planted(1.0), RankSpec(num_buckets=2, keep_buckets=1)), "task", num_buckets=2, keep_buckets=1
    )
    lines = drop_warnings(groups, "task")
    assert lines and "'hard'" in lines[0]


def test_drop_warnings_name_three_tasks_count_the_rest_and_advise_once():
    def group(value: str, dropped: int) -> dict:
        return {"value": value, "rows": 10, "kept": 10 - dropped, "dropped": dropped, "dropped_share": dropped / 10}

    groups = [group(f"t{i}", dropped) for i, dropped in enumerate([6, 10, 5, 9, 8, 7, 1])]  # 5 lose over half
    lines = drop_warnings(groups, "topic")
    assert len(lines) == 4
    assert ["'t1'" in lines[0], "'t3'" in lines[1], "'t4'" in lines[2]] == [True, True, True]
    assert lines[3].startswith("rank: and 2 more topic values lose over half their rows")
    assert [line.count("rank.stratify_by: topic") for line in lines] == [0, 0, 0, 1]
    assert drop_warnings(groups[:2], "topic")[-1].endswith("so that none is dropped whole")
    assert drop_warnings([group("t", 5)], "topic") == []  # half is not over half


def test_task_column_is_named_or_the_first_usual_one():
    assert task_column(None, ["prompt", "category", "topic"]) == "topic"
    assert task_column(None, ["prompt"]) is None
    assert task_column("skill", ["skill", "task"]) == "skill"
    assert task_column("skill", ["task"]) is None


PROMPTS = (
    [f"Translate the sentence into French: the {w} is red." for w in ("cat", "dog", "car", "sky", "sea", "hat")]
    + [f"Summarize the article about {w} in one line." for w in ("taxes", "football", "rain", "music", "art", "war")]
    + [f"Write a poem about {w} and the moon." for w in ("love", "night", "cats", "winter", "home", "time")]
)


def test_clusters_are_deterministic_for_a_seed_and_recover_clear_tasks():
    from sklearn.metrics import adjusted_rand_score

    first = cluster_prompts(PROMPTS, 3, seed=0)
    assert cluster_prompts(PROMPTS, 3, seed=0).tolist() == first.tolist()
    assert first[0] == 0 and set(first.tolist()) == {0, 1, 2}  # numbered by first appearance
    truth = [i // 6 for i in range(18)]
    assert adjusted_rand_score(truth, first) == pytest.approx(1.0)


def test_rank_with_clusters_writes_the_cluster_column(tmp_path):
    n = len(PROMPTS)
    table = pa.table(
        {"example_id": [f"p{i}" for i in range(n)], "input_position": list(range(n)), "prompt": PROMPTS,
         "rouge_l": np.linspace(0, 1, n), "student_ce": np.linspace(2, 0, n)}
    )  # fmt: skip
    summary = run_rank(RankSpec(stratify_clusters=3), table, tmp_path / "rank")
    assert summary["stratify_by"] == "cluster"
    assert [g["rows"] for g in summary["strata"]["groups"]] == [6, 6, 6]
    assert [g["dropped"] for g in summary["strata"]["groups"]] == [1, 1, 1]  # 6 rows: buckets 0,0,1,2,2,3


def test_stratification_settings_and_columns_are_checked_before_any_stage():
    with pytest.raises(ValueError, match=r"stratify_by .* and stratify_clusters .* both set"):
        RankSpec(stratify_by="task", stratify_clusters=4)
    rows = strata_table({"a": 3, "b": 3})
    check_stratification(RankSpec(stratify_by="task"), rows, {})
    with pytest.raises(DataError, match=r"rank.stratify_by: the training rows have no column 'topic'"):
        check_stratification(RankSpec(stratify_by="topic"), rows, {})
    with pytest.raises(DataError, match=r"column 'tags' holds lists or objects"):
        check_stratification(RankSpec(stratify_by="tags"), rows, {"tags": "lists or objects, not one value per row"})
    with_null = rows.set_column(2, "task", pa.array(["a", None, "a", "b", "b", "b"]))
    with pytest.raises(DataError, match=r"column 'task' is empty in 1 row\(s\), first at example_id 'r1'"):
        check_stratification(RankSpec(stratify_by="task"), with_null, {})
    with pytest.raises(DataError, match=r"rank.stratify_clusters is 7, more than the 6 training rows"):
        check_stratification(RankSpec(stratify_clusters=7), rows, {})
    check_stratification(RankSpec(), rows.drop_columns(["task"]), {})  # auto, no task column: a global ranking
    eight = strata_table({"a": 4, "b": 4})
    eight_with_null = eight.set_column(2, "task", pa.array(["a", None, "a", "a", "b", "b", "b", "b"]))
    with pytest.raises(DataError, match=r"empty in 1 row\(s\).*rank.stratify_by is auto.*rank.stratify_by: null"):
        check_stratification(RankSpec(), eight_with_null, {})
    check_stratification(RankSpec(), with_null, {})  # 3 rows a task, under num_buckets: auto ranks globally
    check_stratification(RankSpec(), eight_with_null, {}, named_task="input_position")  # data.fields.task's


def test_auto_takes_the_data_task_column_and_null_is_the_global_ranking():
    assert RankSpec().stratify_by == "auto" and RankSpec().strata_column is None  # unresolved: global
    assert RankSpec().for_task_column("topic").strata_column == "topic"
    assert RankSpec().for_task_column(None).strata_column is None
    assert RankSpec(stratify_by=None).for_task_column("topic").strata_column is None
    assert RankSpec(stratify_by="task").for_task_column("topic").strata_column == "task"
    assert RankSpec(stratify_clusters=4).for_task_column("topic").strata_column == "cluster"
    table = planted(0.9)
    resolved = rank_rows(table, RankSpec().for_task_column("task"))
    assert resolved.equals(rank_rows(table, RankSpec(stratify_by="task")))
    assert not rank_rows(table, RankSpec(stratify_by=None)).equals(resolved)


def test_auto_ranks_globally_where_the_task_column_is_nearly_unique(tmp_path, caplog):
    """A column with fewer than num_buckets rows a value would put every stratum whole into bucket 0."""
    table = planted(0.9)
    table = table.set_column(2, "task", pa.array([f"t{i // 3}" for i in range(80)]))  # 27 values, 3 rows each
    with caplog.at_level(logging.WARNING, logger="srd_ray.rank"):
        summary = run_rank(RankSpec(), table, tmp_path / "rank", task_column="task")
    assert summary["stratify_by"] is None and [b["rows"] for b in summary["buckets"]] == [20, 20, 20, 20]
    assert any("fewer than 4 rows a value on average" in r.getMessage() for r in caplog.records)
    assert resolve_strata(RankSpec(), planted(0.9), "task").strata_column == "task"


def test_the_summary_and_report_show_what_each_task_kept_and_lost(tmp_path):
    """The run summary lists the three most-dropped tasks (and the warning); ``srd report`` draws rows per
    task and bucket, dropped buckets hatched, with a table of every task."""
    import json

    from srd_ray.report import load_manifest, summary_lines, write_report

    run_dir = tmp_path / "run"
    summary = run_rank(RankSpec(stratify_by=None), planted(0.9), run_dir / "rank", task_column="task")
    (run_dir / "run.json").write_text(json.dumps({"run": "run", "stages": {"rank": {"summary": summary}},
                                                  "spec": {"distill": {"stages": [{}, {}, {}]}}}))  # fmt: skip
    lines = summary_lines(load_manifest(run_dir))
    assert "  most dropped tasks: hard 18/20 (90%), b 1/20 (5%), c 1/20 (5%)" in lines
    assert any(line.startswith("  warning: the dropped bucket(s) hold 18 of the 20 rows") for line in lines)
    page = Path(write_report(run_dir).path).read_text()
    assert "Rows per task and bucket" in page and (run_dir / "report" / "tasks.png").exists()
    assert "<tr><td>hard</td><td>20</td><td>2</td><td>18</td><td>90%</td>" in page

    stratified = run_rank(RankSpec(stratify_by="task"), planted(0.9), run_dir / "rank", task_column="task")
    manifest = {"run": "run", "stages": {"rank": {"summary": stratified}}, "spec": {"distill": {"stages": [{}]}}}
    (run_dir / "run.json").write_text(json.dumps(manifest))
    lines = summary_lines(load_manifest(run_dir))
    assert "  stratified by task: 4 strata, each ranked alone" in lines and not any("warning" in x for x in lines)
