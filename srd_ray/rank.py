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
from srd_ray.spec import RankSpec
from srd_ray.storage import Location

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

    ``difficulty_rank`` is always the easy → hard position; ``bucket`` follows ``spec.order``
    (``hard_to_easy`` and ``random``, seeded by ``seed``, are ablations)."""
    _validate(table, spec)
    table = table.take(np.argsort(table["input_position"].to_numpy(), kind="stable"))
    n = table.num_rows
    positions = np.arange(1, n + 1, dtype=np.int64)

    # Each signal stable-sorts the previous signal's sorted list, so its ties keep that order.
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

    easy_to_hard = current[np.argsort(-rrf[current], kind="stable")]
    difficulty_rank = np.empty(n, np.int64)
    difficulty_rank[easy_to_hard] = positions

    if spec.order == "hard_to_easy":
        curriculum = easy_to_hard[::-1]
    elif spec.order == "random":
        curriculum = np.random.default_rng(seed).permutation(n)
    else:
        curriculum = easy_to_hard
    size = n // spec.num_buckets
    bucket = np.empty(n, np.int32)
    bucket[curriculum] = np.minimum(np.arange(n) // size, spec.num_buckets - 1)

    columns = {**rank_columns, "rrf_score": rrf, "difficulty_rank": difficulty_rank, "bucket": bucket}
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values))
    return table.take(curriculum)


def bucket_summary(ranked: pa.Table, spec: RankSpec) -> list[dict[str, Any]]:
    """Rows and signal ranges per bucket; includes the mean of a true ``difficulty`` label if present."""
    summary = []
    for b in range(spec.num_buckets):
        rows = ranked.filter(pc.equal(ranked["bucket"], b))
        entry: dict[str, Any] = {"bucket": b, "rows": rows.num_rows, "kept": b < spec.keep_buckets}
        for name in ("rouge_l", "student_ce", "teacher_ce", "rrf_score"):
            if name not in rows.column_names:
                continue
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


def run_rank(spec: RankSpec, scored: pa.Table, stage_dir: Location | Path, seed: int = 0) -> dict[str, Any]:
    """Rank ``scored`` into ``stage_dir``: one Parquet folder per bucket and the manifest (the summary),
    all appearing at once (a scratch folder moved into place)."""
    with storage.directory(stage_dir) as scratch:
        summary = _write_buckets(spec, scored, scratch, seed)
        storage.write_json(scratch / MANIFEST, summary)
    return summary


def read_manifest(stage_dir: Location | Path) -> dict[str, Any]:
    return json.loads((Location.of(stage_dir) / MANIFEST).read_text())


def _write_buckets(spec: RankSpec, scored: pa.Table, folder: Path, seed: int) -> dict[str, Any]:
    ranked = rank_rows(scored, spec, seed)
    for b in range(spec.num_buckets):
        rows = ranked.filter(pc.equal(ranked["bucket"], b))
        storage.write_parquet(bucket_dir(folder, b) / "part-00000.parquet", rows)
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
    return {
        "rows": ranked.num_rows,
        "k": spec.k,
        "signals": [signal.model_dump() for signal in spec.signals],
        "order": spec.order,
        "num_buckets": spec.num_buckets,
        "keep_buckets": spec.keep_buckets,
        "dropped_rows": sum(e["rows"] for e in buckets if not e["kept"]),
        "buckets": buckets,
    }


# --------------------------------------------------------------------------------------------------------
# Refresh (rank.refresh: every_stage): the rows not yet admitted, ranked again by the current student


def read_ranked(stage_dir: Location | Path) -> pa.Table:
    """Every row of a rank stage (kept and dropped buckets), with its rank columns."""
    manifest = read_manifest(stage_dir)
    folder = Location.of(stage_dir)
    return pa.concat_tables(bucket_dir(folder, b["bucket"]).read_parquet() for b in manifest["buckets"])


def refresh_rows(candidates: pa.Table, spec: RankSpec, bucket: int, size: int) -> pa.Table:
    """``candidates`` (the rows not yet admitted, scored again) ranked easy → hard by the same fusion. The
    easiest ``size`` rows form ``bucket``; the rest are laid out over the later buckets in the same way
    (the last taking the remainder), which only the report uses: the next refresh ranks them again."""
    ranked = rank_rows(candidates, spec.model_copy(update={"num_buckets": 1}))
    later = np.minimum(np.arange(ranked.num_rows) // size, spec.num_buckets - 1 - bucket)
    column = ranked.column_names.index("bucket")
    return ranked.set_column(column, "bucket", pa.array((bucket + later).astype(np.int32)))


def refresh_summary(refreshed: pa.Table, initial: pa.Table, bucket: int) -> dict[str, Any]:
    """How the refresh changed the order of the rows not yet admitted: Spearman's rank correlation with
    their initial order, how many moved to another bucket, and the new bucket's signal means as measured
    now, as measured initially, and those of the initial ``bucket``."""
    where = {example_id: i for i, example_id in enumerate(initial["example_id"].to_pylist())}
    rows = np.array([where[example_id] for example_id in refreshed["example_id"].to_pylist()], np.int64)
    n = len(rows)
    initial_order = np.argsort(np.argsort(initial["difficulty_rank"].to_numpy()[rows], kind="stable"))
    moved = initial_order - np.arange(n)
    spearman = 1.0 - 6.0 * float(np.sum(moved**2)) / (n * (n * n - 1)) if n > 1 else 1.0
    initial_bucket = initial["bucket"].to_numpy()[rows]
    new_bucket = refreshed["bucket"].to_numpy()
    admitted = new_bucket == bucket
    signals = {}
    for name in ("rouge_l", "student_ce"):
        now, before = refreshed[name].to_numpy(), initial[name].to_numpy()
        signals[name] = {
            "admitted_now": float(now[admitted].mean()),
            "admitted_initially": float(before[rows][admitted].mean()),
            "initial_bucket": float(before[initial["bucket"].to_numpy() == bucket].mean()),
        }
    sources = np.unique(initial_bucket[admitted], return_counts=True)
    return {
        "bucket": bucket,
        "candidates": n,
        "admitted": int(admitted.sum()),
        "spearman_with_initial": spearman,
        "changed_bucket": int(np.sum(initial_bucket != new_bucket)),
        "admitted_by_initial_bucket": {str(b): int(c) for b, c in zip(*sources, strict=True)},
        "signals": signals,
    }


def run_refresh_rank(
    spec: RankSpec,
    rescored: pa.Table,
    initial: pa.Table,
    stage_dir: Location | Path,
    bucket: int,
    size: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the refreshed ``bucket`` (``stage_dir/bucket=<b>/``) and its manifest (the summary, plus
    ``extra``), appearing at once."""
    refreshed = refresh_rows(rescored, spec, bucket, size)
    summary = {**refresh_summary(refreshed, initial, bucket), **(extra or {})}
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
