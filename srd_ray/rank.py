"""Rank: reciprocal rank fusion of the reflection signals, then equal curriculum buckets.

The algorithm of the SRD release, reproduced exactly (N rows, in input order):
1. ``rank_rouge``: stable sort by ``rouge_l`` descending; position 1..N (ties keep input order).
2. ``rank_ce``: stable sort of *that ROUGE-sorted list* by ``student_ce`` ascending; position 1..N.
3. ``rrf_score = 1/(k + rank_rouge) + 1/(k + rank_ce)`` with k = 60.
4. Stable sort of *that CE-sorted list* by ``rrf_score`` descending; position = ``difficulty_rank``
   (1 = easiest).
5. ``size = N // num_buckets``; bucket b holds difficulty ranks b*size+1 .. (b+1)*size, the last bucket
   also takes the remainder. Only the first ``keep_buckets`` buckets train.

Variants for ablations: other ``signals`` (any of ``rouge_l``, ``student_ce``, ``teacher_ce``, each with
its direction, fused in the listed order by the same chained stable sorts) and ``order``
(``hard_to_easy`` or ``random`` curricula). The defaults reproduce the release.

Core: :func:`rank_rows` (pure, numpy on Arrow). Driver: :func:`run_rank` writes ``bucket=<b>/`` Parquet
folders and a manifest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from srd_ray import storage
from srd_ray.errors import DataError
from srd_ray.spec import CLUSTER_COLUMN, STRATIFY_AUTO, RankSpec
from srd_ray.storage import Location
from srd_ray.strata import (
    codes_of,
    drop_warnings,
    group_summary,
    most_dropped,
    resolve_strata,
    strata_codes,
    table_with_clusters,
)

log = logging.getLogger(__name__)

RANK_COLUMN = {"rouge_l": "rank_rouge", "student_ce": "rank_ce", "teacher_ce": "rank_teacher_ce"}


def _validate(table: pa.Table, spec: RankSpec) -> None:
    required = ["example_id", "input_position", *(signal.name for signal in spec.signals)]
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise DataError(f"rank: scored rows lack column(s) {missing}; columns: {table.column_names}")
    if table.num_rows < spec.num_buckets:
        raise DataError(f"rank: {table.num_rows} rows cannot fill rank.num_buckets={spec.num_buckets} buckets")
    for signal in spec.signals:
        values = table[signal.name].to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"rank: column {signal.name} has {int(bad.sum())} NaN/infinite value(s), first at example_id "
                f"{table['example_id'][first].as_py()!r}"
            )
    ids = table["example_id"]
    if pc.count_distinct(ids).as_py() != table.num_rows:
        counts = pc.value_counts(ids)
        duplicate = next(item["values"].as_py() for item in counts if item["counts"].as_py() > 1)
        raise DataError(f"rank: duplicate example_id {duplicate!r} in the scored rows")


def rank_rows(table: pa.Table, spec: RankSpec, seed: int = 0) -> pa.Table:
    """Return the rows in curriculum order (easy → hard by default) with the rank columns added.

    ``difficulty_rank`` is always the easy → hard position (within the row's stratum when stratified);
    ``bucket`` follows ``spec.order`` (``hard_to_easy`` and ``random``, seeded by ``seed``, are ablations).
    With ``spec.strata_column`` each stratum is ranked alone and cut by :func:`stratum_buckets`."""
    return _with_rank_columns(table, *curriculum_order(table, spec, seed))


def curriculum_order(table: pa.Table, spec: RankSpec, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`rank_rows` without the copy: the positions in ``table`` of its rows in curriculum order, and
    the rank columns in that order. Ranked on the signal columns (and the rows' strata) alone, in input
    order, so the driver copies the rows, text and all, only when it writes them."""
    _validate(table, spec)
    column = spec.strata_column
    by_position = np.argsort(table["input_position"].to_numpy(), kind="stable")
    signals = table.select([signal.name for signal in spec.signals]).take(by_position)
    if column is None:
        columns, curriculum = _rank_all(signals, spec, np.random.default_rng(seed))
    else:
        columns, curriculum = _rank_strata(signals, spec, strata_codes(table, column)[by_position], seed)
    return by_position[curriculum], {name: values[curriculum] for name, values in columns.items()}


def _with_rank_columns(table: pa.Table, positions: np.ndarray, columns: dict[str, np.ndarray]) -> pa.Table:
    """The rows of ``table`` at ``positions``, with the rank ``columns`` (given in that order) added."""
    ranked = table.take(positions)
    for name, values in columns.items():
        ranked = ranked.append_column(name, pa.array(values))
    return ranked


def _fuse(table: pa.Table, spec: RankSpec) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Reciprocal rank fusion over ``table`` (in input order): the easy → hard row order, each signal's rank
    and the fused score. Each signal stable-sorts the previous signal's sorted list, so its ties keep that
    order; the fused sort starts from the last signal's list."""
    n = table.num_rows
    positions = np.arange(1, n + 1, dtype=np.int64)
    current = np.arange(n)
    rrf = np.zeros(n, np.float64)
    rank_columns = {}
    for signal in spec.signals:
        values = table[signal.name].to_numpy(zero_copy_only=False).astype(np.float64)
        key = -values if signal.easier_when == "higher" else values
        current = current[np.argsort(key[current], kind="stable")]
        rank = np.empty(n, np.int64)
        rank[current] = positions
        rank_columns[RANK_COLUMN[signal.name]] = rank
        rrf += 1.0 / (spec.k + rank)
    return current[np.argsort(-rrf[current], kind="stable")], rank_columns, rrf


def _curriculum(easy_to_hard: np.ndarray, order: str, rng: np.random.Generator) -> np.ndarray:
    if order == "hard_to_easy":
        return easy_to_hard[::-1]
    if order == "random":
        return rng.permutation(len(easy_to_hard))
    return easy_to_hard


def _positions(order: np.ndarray) -> np.ndarray:
    """1-based position of each row in ``order``."""
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def _rank_all(table: pa.Table, spec: RankSpec, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """The release: one ranking; ``size = N // num_buckets`` rows a bucket, the last taking the remainder."""
    n = table.num_rows
    easy_to_hard, rank_columns, rrf = _fuse(table, spec)
    curriculum = _curriculum(easy_to_hard, spec.order, rng)
    bucket = np.empty(n, np.int32)
    bucket[curriculum] = np.minimum(np.arange(n) // (n // spec.num_buckets), spec.num_buckets - 1)
    columns = {**rank_columns, "rrf_score": rrf, "difficulty_rank": _positions(easy_to_hard), "bucket": bucket}
    return columns, curriculum


def stratum_buckets(n: int, num_buckets: int) -> np.ndarray:
    """The bucket of each curriculum position 1..n of an n-row stratum: ``floor(num_buckets * (r - 1) / n)``.
    Every stratum is split into near-equal parts, and one smaller than ``num_buckets`` rows keeps its
    easiest row in bucket 0 (it is never dropped whole)."""
    return (num_buckets * np.arange(n) // n).astype(np.int32)


def _rank_strata(table: pa.Table, spec: RankSpec, codes: np.ndarray, seed: int) -> tuple[dict, np.ndarray]:
    """Each stratum ranked alone by the same fusion and order, cut by :func:`stratum_buckets`. The run's
    curriculum takes bucket 0 of every stratum, then bucket 1, ...; inside a bucket, rows interleave by their
    relative position in their stratum (then stratum order), so any prefix mixes the strata evenly."""
    n = table.num_rows
    columns: dict[str, np.ndarray] = {}
    fraction = np.empty(n, np.float64)
    for code in range(int(codes.max()) + 1):
        rows = np.flatnonzero(codes == code)  # in input order
        easy_to_hard, rank_columns, rrf = _fuse(table.take(rows), spec)
        curriculum = _curriculum(easy_to_hard, spec.order, np.random.default_rng([seed, code]))
        place = _positions(curriculum) - 1
        stratum = {**rank_columns, "rrf_score": rrf, "difficulty_rank": _positions(easy_to_hard),
                   "bucket": stratum_buckets(len(rows), spec.num_buckets)[place]}  # fmt: skip
        for name, values in stratum.items():
            columns.setdefault(name, np.empty(n, values.dtype))[rows] = values
        fraction[rows] = place / len(rows)
    return columns, np.lexsort((codes, fraction, columns["bucket"]))


def bucket_summary(ranked: pa.Table, spec: RankSpec) -> list[dict[str, Any]]:
    """Rows and signal ranges per bucket; includes the mean of a true ``difficulty`` label if present."""
    summary = []
    ranges = [name for name in ("rouge_l", "student_ce", "teacher_ce", "rrf_score") if name in ranked.column_names]
    ranked = ranked.select(["bucket", *ranges, *(["difficulty"] if "difficulty" in ranked.column_names else [])])
    for b in range(spec.num_buckets):
        rows = ranked.filter(pc.equal(ranked["bucket"], b))
        entry: dict[str, Any] = {"bucket": b, "rows": rows.num_rows, "kept": b < spec.keep_buckets}
        for name in ranges:
            low, high = pc.min_max(rows[name]).values()
            entry[name] = {"min": low.as_py(), "mean": pc.mean(rows[name]).as_py(), "max": high.as_py()}
        if "difficulty" in rows.column_names and pa.types.is_integer(rows["difficulty"].type):
            entry["mean_true_difficulty"] = pc.mean(rows["difficulty"]).as_py()
        summary.append(entry)
    return summary


Folder = TypeVar("Folder", Path, Location)


def bucket_dir(stage_dir: Folder, bucket: int) -> Folder:
    return stage_dir / f"bucket={bucket}"


MANIFEST = "manifest.json"


def run_rank(
    spec: RankSpec, scored: pa.Table, stage_dir: Location | Path, seed: int = 0, task_column: str | None = None
) -> dict[str, Any]:
    """Rank ``scored`` into ``stage_dir``: one Parquet folder per bucket and the manifest (the summary),
    all appearing at once (a scratch folder moved into place). ``task_column``: the data's task column,
    if it has one, for the per-task accounting (and the warning when a global ranking drops a task);
    ``rank.stratify_by: auto`` stratifies by it."""
    resolved = resolve_strata(spec, scored, task_column)
    if resolved.strata_column is None and task_column in scored.column_names and spec.stratify_by == STRATIFY_AUTO:
        log.warning("rank: %r has fewer than %d rows a value on average: ranked over all rows, not within it",
                    task_column, spec.num_buckets)  # fmt: skip
    spec = resolved
    if spec.stratify_clusters is not None:
        scored = table_with_clusters(scored, CLUSTER_COLUMN, spec.stratify_clusters, seed)
    positions, columns = curriculum_order(scored, spec, seed)
    summary = rank_summary(_with_rank_columns(summary_columns(scored, spec, task_column), positions, columns),
                           spec, task_column)  # fmt: skip
    for line in summary.get("warnings", []):
        log.warning("%s", line)
    with storage.directory(stage_dir) as scratch:
        for b in range(spec.num_buckets):
            # One bucket's rows copied at a time: a whole ranked copy beside the scored rows cost the driver
            # their size again.
            rows = columns["bucket"] == b
            bucket = _with_rank_columns(scored, positions[rows], {name: v[rows] for name, v in columns.items()})
            storage.write_parquet(bucket_dir(scratch, b) / "part-00000.parquet", bucket)
        storage.write_json(scratch / MANIFEST, summary)
    return summary


def summary_columns(scored: pa.Table, spec: RankSpec, task_column: str | None) -> pa.Table:
    """The columns the manifest summarises (signals, true difficulty, strata, tasks): not the text."""
    wanted = {"rouge_l", "student_ce", "teacher_ce", "difficulty", spec.strata_column, task_column}
    return scored.select([name for name in scored.column_names if name in wanted])


def read_manifest(stage_dir: Location | Path) -> dict[str, Any]:
    return json.loads((Location.of(stage_dir) / MANIFEST).read_text())


def rank_summary(ranked: pa.Table, spec: RankSpec, task_column: str | None) -> dict[str, Any]:
    """The manifest: settings, per bucket rows and signals, and per stratum and per task (rows kept and
    dropped, per bucket), with a warning for each task a global ranking mostly drops."""
    buckets = bucket_summary(ranked, spec)
    for entry in buckets:
        log.info(
            "rank: bucket %d%s %d rows, rouge_l mean %.3f, student_ce mean %.3f%s",
            entry["bucket"],
            "" if entry["kept"] else " (dropped)",
            entry["rows"],
            entry["rouge_l"]["mean"],
            entry["student_ce"]["mean"],
            f", true difficulty mean {entry['mean_true_difficulty']:.2f}" if "mean_true_difficulty" in entry else "",
        )
    summary: dict[str, Any] = {
        "rows": ranked.num_rows,
        "k": spec.k,
        "signals": [signal.model_dump() for signal in spec.signals],
        "order": spec.order,
        "num_buckets": spec.num_buckets,
        "keep_buckets": spec.keep_buckets,
        "dropped_rows": sum(e["rows"] for e in buckets if not e["kept"]),
        "buckets": buckets,
        "stratify_by": spec.strata_column,
    }
    groups = {"strata": spec.strata_column, "tasks": task_column if task_column in ranked.column_names else None}
    for key, column in groups.items():
        if column is not None:
            summary[key] = {"column": column,
                            "groups": group_summary(ranked, column, spec.num_buckets, spec.keep_buckets)}  # fmt: skip
    if "tasks" in summary:
        summary["most_dropped_tasks"] = most_dropped(summary["tasks"]["groups"])
        if spec.strata_column is None:
            summary["warnings"] = drop_warnings(summary["tasks"]["groups"], summary["tasks"]["column"])
    return summary


# --------------------------------------------------------------------------------------------------------
# Refresh (rank.refresh: every_stage): the rows not yet admitted, ranked again by the current student


def read_ranked(stage_dir: Location | Path) -> pa.Table:
    """Every row of a rank stage (kept and dropped buckets), with its rank columns."""
    manifest = read_manifest(stage_dir)
    folder = Location.of(stage_dir)
    return pa.concat_tables(bucket_dir(folder, b["bucket"]).read_parquet() for b in manifest["buckets"])


def bucket_quotas(initial: pa.Table, column: str | None, num_buckets: int) -> dict[Any, list[int]]:
    """Rows per bucket of each stratum (one stratum, ``None``, without stratification) in the initial
    ranking: how many rows of it each refresh admits, so a refreshed run trains on as many rows of every
    stratum, stage by stage, as the initial ranking planned."""
    codes, names = codes_of(initial[column]) if column is not None else (np.zeros(initial.num_rows, np.int64), [None])
    cells = codes * num_buckets + initial["bucket"].to_numpy()
    counts = np.bincount(cells, minlength=len(names) * num_buckets).reshape(len(names), num_buckets)
    return {name: counts[g].tolist() for g, name in enumerate(names)}


def refresh_rows(candidates: pa.Table, spec: RankSpec, bucket: int, quotas: dict[Any, list[int]]) -> pa.Table:
    """``candidates`` (the rows not yet admitted, scored again) ranked easy → hard by the same fusion, within
    each stratum when stratified. The easiest ``quotas[stratum][bucket]`` rows of each stratum form
    ``bucket``; the rest are laid out over the later buckets by their quotas (the last taking the
    remainder), which only the report uses: the next refresh ranks them again."""
    ranked = rank_rows(candidates, spec.model_copy(update={"num_buckets": 1}))
    column = spec.strata_column
    codes, names = codes_of(ranked[column]) if column is not None else (np.zeros(ranked.num_rows, np.int64), [None])
    place = ranked["difficulty_rank"].to_numpy() - 1  # within the stratum
    later = np.empty(ranked.num_rows, np.int64)
    sizes = np.bincount(codes, minlength=len(names))
    for code, name in enumerate(names):
        here = codes == code
        edges = np.cumsum(quotas.get(name, [0] * spec.num_buckets)[bucket : spec.num_buckets - 1])
        later[here] = np.searchsorted(edges, place[here], side="right")
    buckets = (bucket + later).astype(np.int32)
    ranked = ranked.set_column(ranked.column_names.index("bucket"), "bucket", pa.array(buckets))
    return ranked.take(np.lexsort((codes, place / sizes[codes], buckets)))


def with_strata(candidates: pa.Table, initial: pa.Table, column: str | None) -> pa.Table:
    """``candidates`` with the strata column of the initial ranking (clusters exist only there)."""
    if column is None or column in candidates.column_names:
        return candidates
    of_id = dict(zip(initial["example_id"].to_pylist(), initial[column].to_pylist(), strict=True))
    values = [of_id[example_id] for example_id in candidates["example_id"].to_pylist()]
    return candidates.append_column(column, pa.array(values, initial[column].type))


def _spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation of two orderings of the same rows (ties broken by position)."""
    n = len(first)
    if n < 2:
        return 1.0
    a, b = (np.argsort(np.argsort(values, kind="stable"), kind="stable") for values in (first, second))
    return 1.0 - 6.0 * float(np.sum((a - b) ** 2)) / (n * (n * n - 1))


def refresh_summary(refreshed: pa.Table, initial: pa.Table, bucket: int, column: str | None = None) -> dict[str, Any]:
    """How the refresh changed the order of the rows not yet admitted: Spearman's rank correlation with
    their initial order (within each stratum, weighted by its rows, when stratified), how many moved to
    another bucket, the new bucket's signal means as measured now, as measured initially, and those of the
    initial ``bucket``, and (stratified) the rows admitted from each stratum."""
    where = {example_id: i for i, example_id in enumerate(initial["example_id"].to_pylist())}
    rows = np.array([where[example_id] for example_id in refreshed["example_id"].to_pylist()], np.int64)
    n = len(rows)
    codes, names = codes_of(refreshed[column]) if column is not None else (np.zeros(n, np.int64), [None])
    before, now = initial["difficulty_rank"].to_numpy()[rows], refreshed["difficulty_rank"].to_numpy()
    weighted = [(np.sum(codes == c), _spearman(before[codes == c], now[codes == c])) for c in range(len(names))]
    spearman = sum(size * rho for size, rho in weighted) / max(n, 1)
    initial_bucket = initial["bucket"].to_numpy()[rows]
    new_bucket = refreshed["bucket"].to_numpy()
    admitted = new_bucket == bucket
    signals = {}
    for name in ("rouge_l", "student_ce"):
        measured_now, measured_before = refreshed[name].to_numpy(), initial[name].to_numpy()
        signals[name] = {
            "admitted_now": float(measured_now[admitted].mean()),
            "admitted_initially": float(measured_before[rows][admitted].mean()),
            "initial_bucket": float(measured_before[initial["bucket"].to_numpy() == bucket].mean()),
        }
    sources = np.unique(initial_bucket[admitted], return_counts=True)
    summary = {
        "bucket": bucket,
        "candidates": n,
        "admitted": int(admitted.sum()),
        "spearman_with_initial": spearman,
        "changed_bucket": int(np.sum(initial_bucket != new_bucket)),
        "admitted_by_initial_bucket": {str(b): int(c) for b, c in zip(*sources, strict=True)},
        "signals": signals,
    }
    if column is not None:
        counts = np.bincount(codes[admitted], minlength=len(names))
        summary["admitted_by_stratum"] = {"column": column, "groups": [
            {"value": name, "candidates": int(np.sum(codes == g)), "admitted": int(counts[g])}
            for g, name in enumerate(names)]}  # fmt: skip
    return summary


def run_refresh_rank(
    spec: RankSpec,
    rescored: pa.Table,
    initial: pa.Table,
    stage_dir: Location | Path,
    bucket: int,
    quotas: dict[Any, list[int]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the refreshed ``bucket`` (``stage_dir/bucket=<b>/``) and its manifest (the summary, plus
    ``extra``), appearing at once."""
    column = spec.strata_column
    refreshed = refresh_rows(with_strata(rescored, initial, column), spec, bucket, quotas)
    summary = {**refresh_summary(refreshed, initial, bucket, column), **(extra or {})}
    log.info(
        "refresh: bucket %d from %d rows not yet admitted; Spearman with the initial order %.3f, %d rows changed "
        "bucket, rouge_l mean %.3f (initially %.3f)", bucket, summary["candidates"], summary["spearman_with_initial"],
        summary["changed_bucket"], summary["signals"]["rouge_l"]["admitted_now"],
        summary["signals"]["rouge_l"]["admitted_initially"],
    )  # fmt: skip
    with storage.directory(stage_dir) as scratch:
        rows = refreshed.filter(pc.equal(refreshed["bucket"], bucket))
        storage.write_parquet(bucket_dir(scratch, bucket) / "part-00000.parquet", rows)
        storage.write_json(scratch / MANIFEST, summary)
    return summary
