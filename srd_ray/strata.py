"""Strata for the rank stage, and the accounting that shows when a curriculum drops a task.

Real instruction data is multi-task, and difficulty often follows the task: ranked over all rows, the
hardest bucket can hold most of one task's rows, and dropping it deletes that skill from the student.
Ranking within strata (``rank.stratify_by``, ``rank.stratify_clusters``) keeps every task, and is the
default (``auto``, :func:`resolve_strata`) wherever the data has a task column; for data with a task
column and a global ranking asked for (``null``), :func:`drop_warnings` says which tasks the dropped
buckets take.

- :func:`task_column`: which column is a row's task (``data.train.fields.task``, else the first present of
  ``task``, ``topic``, ``category``).
- :func:`cluster_prompts`: strata for data without a task column: k-means over TF-IDF vectors of the
  prompts (scikit-learn). TF-IDF because rows of one task share their instruction's wording, which it
  captures on the CPU in the rank stage itself, with no model pass and deterministically for a seed; the
  clusters' agreement with hidden task labels is measured in ``bench/srd_evidence.py``.
- :func:`group_summary`: rows, signal means and rows dropped per stratum (or task) and bucket.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from srd_ray.errors import DataError
from srd_ray.spec import STRATIFY_AUTO, TASK_COLUMNS, RankSpec

# Warn when the dropped buckets hold more than this share of one task's rows.
DROPPED_SHARE_WARNING = 0.5
WARNED_TASKS = 3  # tasks a warning names one by one
# Dimensions the TF-IDF vectors are reduced to (latent semantic analysis) before k-means.
CLUSTER_DIMENSIONS = 100


def task_column(named: str | None, columns: Iterable[str]) -> str | None:
    """The column holding each row's task: the one ``data.train.fields.task`` names, else the first present
    of ``TASK_COLUMNS``, else None."""
    columns = set(columns)
    if named is not None:
        return named if named in columns else None
    return next((name for name in TASK_COLUMNS if name in columns), None)


def resolve_strata(spec: RankSpec, table: pa.Table, task: str | None) -> RankSpec:
    """``spec`` with ``stratify_by: auto`` resolved against ``table``, whose task column is ``task``
    (:func:`task_column`): stratified by it, unless its strata hold fewer than ``num_buckets`` rows on
    average; such a column (an id, a free-text label) would put each stratum whole into bucket 0, ordering
    and dropping nothing, so the ranking stays global."""
    if spec.stratify_by == STRATIFY_AUTO and task is not None and task in table.column_names:
        strata = pc.count_distinct(table[task]).as_py()
        if strata and table.num_rows / strata < spec.num_buckets:
            task = None
    return spec.for_task_column(task)


def cluster_prompts(prompts: list[str], num_clusters: int, seed: int) -> np.ndarray:
    """Each prompt's cluster, 0..num_clusters-1, numbered in order of first appearance (so the same data
    and seed give the same labels): k-means (10 restarts, seeded) on L2-normalised LSA vectors (TF-IDF of
    words and word pairs, sublinear term counts, reduced by truncated SVD)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    if len(prompts) < num_clusters:
        raise DataError(
            f"rank.stratify_clusters is {num_clusters}, more than the {len(prompts)} training rows to cluster"
        )
    vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit_transform(prompts)
    dimensions = min(CLUSTER_DIMENSIONS, vectors.shape[1] - 1, len(prompts) - 1)
    if dimensions >= 2:
        vectors = normalize(TruncatedSVD(dimensions, random_state=seed).fit_transform(vectors))
    labels = KMeans(num_clusters, n_init=10, random_state=seed).fit_predict(vectors)
    _, first = np.unique(labels, return_index=True)
    renumber = np.empty(labels.max() + 1, np.int64)
    renumber[labels[np.sort(first)]] = np.arange(len(first))
    return renumber[labels]


def codes_of(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[Any]]:
    """Each row's group as 0..G-1 and the G values in sorted order (nulls, if any, form the last group)."""
    unique = pc.unique(values).drop_null().sort()
    codes = pc.index_in(values, value_set=unique).fill_null(len(unique))
    names = unique.to_pylist() + ([None] if values.null_count else [])
    return codes.to_numpy(zero_copy_only=False).astype(np.int64), names


def strata_codes(table: pa.Table, column: str) -> np.ndarray:
    """Each row's stratum as 0..S-1, strata in sorted order of their values. The column must hold one
    value per row, none of them null: a clear error names it otherwise."""
    if column not in table.column_names:
        raise DataError(
            f"rank.stratify_by: the training rows have no column {column!r}; columns: {sorted(table.column_names)}"
        )
    values = table[column]
    if pa.types.is_nested(values.type):
        raise DataError(f"rank.stratify_by: column {column!r} holds {values.type}, not one value per row")
    if values.null_count:
        first = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"rank.stratify_by: column {column!r} is empty in {values.null_count} row(s), first at example_id "
            f"{table['example_id'][first].as_py()!r}"
        )
    return codes_of(values)[0]


def group_summary(ranked: pa.Table, column: str, num_buckets: int, keep_buckets: int) -> list[dict[str, Any]]:
    """Per value of ``column`` (sorted): its rows, rows kept and dropped, and per bucket its rows and mean
    signals. Linear in the rows, whatever the number of groups."""
    codes, names = codes_of(ranked[column])
    cells = codes * num_buckets + ranked["bucket"].to_numpy()
    size = len(names) * num_buckets
    counts = np.bincount(cells, minlength=size).reshape(len(names), num_buckets)
    means = {}
    for name in ("rouge_l", "student_ce"):
        if name in ranked.column_names:
            sums = np.bincount(cells, weights=ranked[name].to_numpy(zero_copy_only=False), minlength=size)
            means[name] = sums.reshape(counts.shape) / np.maximum(counts, 1)
    groups = []
    for g, value in enumerate(names):
        per_bucket = [{"bucket": b, "rows": int(counts[g, b]),
                       **{name: float(mean[g, b]) for name, mean in means.items() if counts[g, b]}}
                      for b in range(num_buckets)]  # fmt: skip
        total, dropped = int(counts[g].sum()), int(counts[g, keep_buckets:].sum())
        groups.append({"value": value, "rows": total, "kept": total - dropped, "dropped": dropped,
                       "dropped_share": dropped / total, "buckets": per_bucket})  # fmt: skip
    return groups


def most_dropped(groups: list[dict[str, Any]], count: int = 3) -> list[dict[str, Any]]:
    """The ``count`` groups that lose the largest share of their rows (ties: more rows dropped first)."""
    losing = [group for group in groups if group["dropped"]]
    return sorted(losing, key=lambda g: (-g["dropped_share"], -g["dropped"], str(g["value"])))[:count]


def drop_warnings(groups: list[dict[str, Any]], column: str) -> list[str]:
    """Under a global ranking, the tasks whose dropped share exceeds ``DROPPED_SHARE_WARNING``, worst first:
    the first ``WARNED_TASKS`` by name, the rest counted in one line (data with hundreds of tasks, such as
    S-NI, would otherwise fill the console), and what to do about it once, at the end."""
    deleted = [group for group in most_dropped(groups, len(groups)) if group["dropped_share"] > DROPPED_SHARE_WARNING]
    lines = [
        f"rank: the dropped bucket(s) hold {g['dropped']} of the {g['rows']} rows ({100 * g['dropped_share']:.0f}%) "
        f"of {column} {g['value']!r}; the student will barely see it"
        for g in deleted[:WARNED_TASKS]
    ]
    if len(deleted) > WARNED_TASKS:
        lines.append(f"rank: and {len(deleted) - WARNED_TASKS} more {column} values lose over half their rows "
                     f"(srd report draws every {column})")  # fmt: skip
    if lines:
        lines[-1] += f". Set rank.stratify_by: {column} to rank within each task, so that none is dropped whole"
    return lines


def table_with_clusters(table: pa.Table, column: str, num_clusters: int, seed: int) -> pa.Table:
    """``table`` with each row's prompt cluster in ``column`` (replacing one already there)."""
    labels = pa.array(cluster_prompts(table["prompt"].to_pylist(), num_clusters, seed), pa.int64())
    if column in table.column_names:
        return table.set_column(table.column_names.index(column), column, labels)
    return table.append_column(column, labels)


def check_stratification(
    spec: RankSpec, rows: pa.Table, dropped_columns: dict[str, str], named_task: str | None = None
) -> None:
    """Before any stage runs: the strata column (``auto``: the task column, ``data.train.fields.task``
    or the first present of ``TASK_COLUMNS``) exists in the training rows, holds one value per row and
    no nulls; there are at least as many rows as clusters."""
    resolved = resolve_strata(spec, rows, task_column(named_task, rows.column_names))
    if resolved.stratify_by is not None:
        if resolved.stratify_by in dropped_columns:
            column = resolved.stratify_by
            raise DataError(f"rank.stratify_by: column {column!r} holds {dropped_columns[column]}")
        try:
            strata_codes(rows, resolved.stratify_by)
        except DataError as error:
            if spec.stratify_by != STRATIFY_AUTO:
                raise
            raise DataError(
                f"{error} (rank.stratify_by is auto, which ranks within the data's task column: fill it, name "
                "another column, or set rank.stratify_by: null for the release's global ranking)"
            ) from None
    if spec.stratify_clusters is not None and rows.num_rows < spec.stratify_clusters:
        raise DataError(
            f"rank.stratify_clusters is {spec.stratify_clusters}, more than the {rows.num_rows} training rows"
        )
