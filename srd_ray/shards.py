"""Resumable sharded passes: rows cut into fixed shards, each written whole by a Ray Data actor with the
settings that made it, so an interrupted pass resumes with the shards it has not finished and never mixes
shards made with other settings.

Reflection and the teacher's top-k pass are both such passes: a ``ShardedPass`` names the stage, its
shard folder and settings; the stage supplies the actor that turns a shard into scored rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from srd_ray import storage
from srd_ray.errors import DataError, RunDirError
from srd_ray.progress import Progress
from srd_ray.spec import PoolSpec
from srd_ray.storage import Location

log = logging.getLogger(__name__)

REJECTED_KEY = b"srd_ray.rejected"  # rows an engine rejected, in their shard's metadata
# Rows per Parquet row group of a teacher-signal shard: training reads the signal of its micro-batches'
# rows a row group at a time (srd_ray.distill.rows), never a whole shard. Other shards are one row group:
# they are read whole, and 16-row groups raised the rank stage's peak by 98 MB at 100k rows
# (bench/results/shard_row_groups.md).
ROW_GROUP_ROWS = 16


def split_into_shards(table: pa.Table, shard_rows: int) -> list[pa.Table]:
    """Fixed shards by input position: the same data and shard size always give the same shards. Each
    shard carries its ``shard_index`` column."""
    positions = table["input_position"].to_numpy()
    # Loaded data is already in input order: slicing it copies nothing (sorting would copy every row).
    ordered = table if bool(np.all(positions[1:] >= positions[:-1])) else table.sort_by("input_position")
    return [
        ordered.slice(start, shard_rows).append_column(
            "shard_index", pa.array(np.full(min(shard_rows, ordered.num_rows - start), start // shard_rows), pa.int32())
        )
        for start in range(0, ordered.num_rows, shard_rows)
    ]


@dataclass(frozen=True)
class ShardedPass:
    stage: str  # for messages and --redo hints: "reflect", "teacher_signal"
    shards_dir: Location
    settings_key: bytes  # the Parquet schema metadata key the settings are stored under
    settings: dict[str, Any]
    row_group_rows: int | None = None  # rows per Parquet row group of a shard; None: one group

    def shard_path(self, index: int) -> Location:
        return self.shards_dir / f"shard-{index:05d}.parquet"

    def schema(self, columns: pa.Schema) -> pa.Schema:
        """The shard's columns with the settings that made it in the metadata."""
        return columns.with_metadata({self.settings_key: json.dumps(self.settings, sort_keys=True)})

    def write(self, index: int, rows: pa.Table | None, columns: pa.Schema, rejected: list[dict] | None = None) -> None:
        """A shard's rows (None: every row was rejected), with the rows the engine rejected (example_id,
        reason) in the same file's metadata, so they are written, and counted, exactly once."""
        schema = self.schema(columns)
        if rejected:
            schema = schema.with_metadata({**schema.metadata, REJECTED_KEY: json.dumps(rejected)})
        rows = pa.Table.from_pylist([], schema) if rows is None else rows.select(schema.names).cast(schema)
        storage.write_parquet(self.shard_path(index), rows, row_group_size=self.row_group_rows)

    def pending(self, shards: list[pa.Table]) -> list[pa.Table]:
        """The shards still to do; finished ones are checked (readable, same settings) and kept."""
        storage.remove_partials(self.shards_dir)
        finished = {shard.name for shard in self.shards_dir.children()}
        todo = []
        for shard in shards:
            path = self.shard_path(shard["shard_index"][0].as_py())
            if path.name in finished:
                self.check_existing(path)
            else:
                todo.append(shard)
        return todo

    def check_existing(self, path: Location) -> None:
        """A finished shard is reused only if it is readable and was made with exactly these settings."""
        try:
            schema = path.parquet_file().schema_arrow
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(
                f"{path}: unreadable {self.stage} shard ({error}); delete it and rerun to recompute it"
            ) from None
        made_with = json.loads((schema.metadata or {}).get(self.settings_key, b"{}"))
        if made_with != self.settings:
            keys = self.settings.keys() | made_with.keys()
            changed = sorted(key for key in keys if self.settings.get(key) != made_with.get(key))
            raise RunDirError(
                f"{path} was made with other {self.stage} settings ({', '.join(changed)} differ); rerun with "
                f"--redo {self.stage} to replace every shard, or use another run.name"
            )

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every shard as one table, in input order. Shards are read in index order, which is input order
        unless shards were made from rows in another order: only then is the table sorted (a copy)."""
        table = pa.concat_tables(list(self.tables(columns)), promote_options="permissive")
        if "input_position" not in table.column_names:
            return table
        positions = table["input_position"].to_numpy()
        return table if np.all(positions[1:] >= positions[:-1]) else table.sort_by("input_position")

    def stored_schema(self) -> pa.Schema:
        """The shards' columns and settings metadata, from the first shard's footer (every shard of a pass
        has the same)."""
        return self._shard_paths()[0].parquet_file().schema_arrow

    def _shard_paths(self) -> list[Location]:
        shards = [shard for shard in self.shards_dir.children() if shard.name.endswith(".parquet")]
        if not shards:
            raise FileNotFoundError(f"no {self.stage} shards in {self.shards_dir}")
        return shards

    def tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Each shard's table in turn, in shard index order (``children`` sorts by name): for summaries that
        need not hold every shard in memory at once."""
        for path in self._shard_paths():
            try:
                table = path.read_parquet(columns=columns)
            except (pa.ArrowInvalid, OSError) as error:
                raise DataError(f"{path}: unreadable {self.stage} shard ({error}); delete it and rerun") from None
            # One chunk per column, not one per row group: small chunks cost far more memory than their rows.
            yield table.combine_chunks()

    def rejected(self) -> list[dict[str, str]]:
        """Rows the engine rejected (set aside under ``data.on_bad_row: skip``), from every shard."""
        found = []
        for path in self.shards_dir.children():
            if path.name.endswith(".parquet"):
                metadata = path.parquet_file().schema_arrow.metadata or {}
                found += json.loads(metadata.get(REJECTED_KEY, b"[]"))
        return found

    def score(
        self,
        todo: list[pa.Table],
        engine: type,
        engine_kwargs: dict[str, Any],
        pool: PoolSpec,
        writer: ShardWriter,
        tokens_label: str,
    ) -> dict[str, Any]:
        """The shards in ``todo`` through two Ray Data stages: ``engine`` actors (built once per actor with
        ``engine_kwargs``; only the engine runs there), then ``writer`` tasks (CPU work and writing), so an
        engine never waits for ROUGE or Parquet. Progress is logged as shards are written; our own errors
        raised in actors surface as themselves."""
        import ray

        from srd_ray.failures import reraise_srd_error
        from srd_ray.pools import map_with_engine_actors

        if not todo:
            return {"rows": 0, "tokens": 0, "busy_s": 0.0}
        scored = map_with_engine_actors(
            todo, engine, engine_kwargs, pool, engine=self.settings["engine"], batch_size=None
        )
        # One writer actor, taking no CPU from the engines (a shard's CPU work is milliseconds). An actor,
        # not tasks: it starts with the engines, so shards are written as they come; tasks would each need a
        # fresh worker process, whose imports (torch) wait behind the busy engines for as long as they run.
        # One actor also sees every piece of a shard that Ray Data split into several blocks.
        sizes = {shard[SHARD_INDEX][0].as_py(): shard.num_rows for shard in todo}
        written = scored.map_batches(
            type(writer), fn_constructor_kwargs={**writer.settings(), "shard_sizes": sizes}, batch_size=None,
            batch_format="pyarrow", num_cpus=0, compute=ray.data.ActorPoolStrategy(size=1),
        )  # fmt: skip
        with reraise_srd_error():
            total = sum(shard.num_rows for shard in todo)
            return follow_progress(self.stage, written.iter_rows(), total, tokens_label)

    def check_complete(self, expected_ids: pa.ChunkedArray | Iterable[str], done: pa.Table) -> None:
        """Every input example_id done exactly once (or rejected): nothing lost, duplicated or foreign.
        Counted with Arrow's hash sets: no Python object per row, as the driver may hold millions of ids."""
        if not isinstance(expected_ids, pa.Array | pa.ChunkedArray):
            expected_ids = pa.array(list(expected_ids), pa.string())
        done_ids = done["example_id"]
        rejected = pa.array([row["example_id"] for row in self.rejected()], pa.string())
        expected = pc.filter(expected_ids, pc.invert(pc.is_in(expected_ids, value_set=rejected)))
        duplicates = len(done_ids) - pc.count_distinct(done_ids).as_py()
        missing = pc.sum(pc.invert(pc.is_in(expected, value_set=done_ids))).as_py() or 0
        extra = pc.sum(pc.invert(pc.is_in(done_ids, value_set=expected))).as_py() or 0
        if missing or extra or duplicates:
            raise DataError(
                f"{self.stage} shards hold {done.num_rows} rows for {len(expected)} inputs: {missing} "
                f"missing, {extra} not in the input, {duplicates} duplicated; rerun with --redo {self.stage}"
            )


def score_isolating_rows(
    rows: pa.Table, score: Callable[[pa.Table], pa.Table], row_errors: tuple[type[BaseException], ...]
) -> tuple[pa.Table | None, list[dict[str, str]]]:
    """``score(rows)``, with the rows an engine rejects (``row_errors``: its per-request validation errors)
    set aside with their reason instead of failing the shard. A failing batch is halved until each bad
    row stands alone: one bad row costs about log2(rows) extra calls. Other errors (the engine itself
    failing) propagate."""
    try:
        return score(rows), []
    except row_errors as error:
        if rows.num_rows == 1:
            return None, [{"example_id": rows["example_id"][0].as_py(), "reason": f"{type(error).__name__}: {error}"}]
    half = rows.num_rows // 2
    first, first_rejected = score_isolating_rows(rows.slice(0, half), score, row_errors)
    second, second_rejected = score_isolating_rows(rows.slice(half), score, row_errors)
    scored = [table for table in (first, second) if table is not None]
    return (pa.concat_tables(scored) if scored else None), first_rejected + second_rejected


def check_rejected(stage: str, rejected: list[dict[str, str]], on_bad_row: str) -> None:
    """Under ``data.on_bad_row: error`` a rejected row stops the job, naming it."""
    if rejected and on_bad_row == "error":
        first = rejected[0]
        raise DataError(
            f"{stage}: the engine rejects row {first['example_id']} ({first['reason']})"
            + (f" and {len(rejected) - 1} more" if len(rejected) > 1 else "")
            + "; set data.on_bad_row: skip to leave such rows out"
        )


def follow_progress(stage: str, summaries: Iterable[dict[str, Any]], total_rows: int, tokens_label: str) -> dict:
    """Progress as actors finish shards: rows done, rows/s, tokens/s and ETA. ``summaries`` yields one
    ``{"shard_index", "rows", "tokens", "seconds"}`` record per shard written; a shard whose writer call Ray
    retried after a crash counts once."""
    done = {"rows": 0, "tokens": 0, "busy_s": 0.0}
    counted: set[int] = set()
    with Progress(stage, total_rows, "rows") as progress:
        for summary in summaries:
            if summary["shard_index"] in counted:
                continue
            counted.add(summary["shard_index"])
            done["rows"] += summary["rows"]
            done["tokens"] += summary["tokens"]
            done["busy_s"] += summary["seconds"]
            elapsed = max(time.perf_counter() - progress.started, 1e-9)
            progress.update(done["rows"], **{f"{tokens_label}/s": done["tokens"] / elapsed})
    return done


# Columns the engine stage adds for the writer stage (dropped before a shard is written).
SHARD_INDEX, ENGINE_SECONDS, REJECTED = "shard_index", "engine_seconds", "rejected_reason"
PASS_COLUMNS = (SHARD_INDEX, ENGINE_SECONDS, REJECTED)
SUMMARY_SCHEMA = pa.schema([("shard_index", pa.int64()), ("rows", pa.int64()), ("tokens", pa.int64()),
                            ("seconds", pa.float64())])  # fmt: skip


def shards_in(batch: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """A batch is normally one shard (one block), but may hold pieces of several: group, so shard files
    never mix."""
    for index in sorted(set(batch[SHARD_INDEX].to_pylist())):
        yield index, batch.filter(pc.equal(batch[SHARD_INDEX], index))


def mark_rejected(rows: pa.Table, rejected: list[dict[str, str]]) -> pa.Table:
    """The rejected rows as they came in, each with its reason (so they travel to the writer)."""
    reasons = {r["example_id"]: r["reason"] for r in rejected}
    aside = rows.filter(pc.is_in(rows["example_id"], pa.array(list(reasons), pa.string())))
    return aside.append_column(REJECTED, pa.array([reasons[i] for i in aside["example_id"].to_pylist()], pa.string()))


def split_rejected(shard: pa.Table) -> tuple[pa.Table, list[dict[str, str]]]:
    """Undo ``mark_rejected``: the scored rows, and the rejected ones as ``{"example_id", "reason"}``."""
    if REJECTED not in shard.column_names:
        return shard, []
    marked = pc.invert(pc.is_null(shard[REJECTED]))
    aside = shard.filter(marked)
    reasons = zip(aside["example_id"].to_pylist(), aside[REJECTED].to_pylist(), strict=True)
    return shard.filter(pc.invert(marked)), [{"example_id": i, "reason": r} for i, r in reasons]


def with_constants(table: pa.Table, values: dict[str, Any]) -> pa.Table:
    for name, value in values.items():
        table = table.append_column(name, pa.array([value] * table.num_rows))
    return table


@dataclass(frozen=True)
class ShardEngine:
    """The engine side of a pass, in an actor: score each shard's rows (``score``: Arrow in, Arrow out).
    Rows the engine rejects (``row_errors``, its per-request validation errors) are kept, marked with
    their reason, instead of failing the shard; under ``on_bad_row: error`` they stop the job."""

    stage: str
    score: Callable[[pa.Table], pa.Table]
    row_errors: tuple[type[BaseException], ...]
    on_bad_row: str

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = []
        for index, shard in shards_in(batch):
            started = time.perf_counter()
            rows = shard.drop_columns([SHARD_INDEX])
            scored, rejected = score_isolating_rows(rows, self.score, self.row_errors)
            check_rejected(self.stage, rejected, self.on_bad_row)
            marks = {SHARD_INDEX: index, ENGINE_SECONDS: time.perf_counter() - started}
            for table in (scored, mark_rejected(rows, rejected)):
                if table is not None and table.num_rows:
                    parts.append(with_constants(table, marks))
        # Scored and rejected rows differ in columns: each side's missing ones are null.
        return pa.concat_tables(parts, promote_options="permissive")


@dataclass
class ShardWriter:
    """The CPU side of a pass, in one actor beside the engine actors: collect each shard's scored rows until
    all ``shard_sizes[index]`` have arrived (Ray Data splits a block larger than its block-size limit into
    several, e.g. a teacher-signal shard at k 1024), then finish them (``finish``, e.g. ROUGE-L), write the
    shard whole with the rows set aside, and return one summary row per shard written."""

    sharded: ShardedPass
    finish: Callable[[pa.Table], pa.Table]
    columns: Callable[[pa.Table | None], pa.Schema]
    tokens_column: str
    shard_sizes: dict[int, int] = field(default_factory=dict)  # rows of each shard of the pass
    arrived: dict[int, list[pa.Table]] = field(default_factory=dict, init=False)
    seconds: dict[int, float] = field(default_factory=dict, init=False)

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments (what the actor is built from)."""
        return {name: getattr(self, name) for name in ("sharded", "finish", "columns", "tokens_column")}

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = []
        for index, piece in shards_in(batch):
            self.arrived.setdefault(index, []).append(piece)
            self.seconds[index] = self.seconds.get(index, 0.0) + piece[ENGINE_SECONDS][0].as_py()
            rows = sum(part.num_rows for part in self.arrived[index])
            if rows > self.shard_sizes[index]:
                raise RuntimeError(f"{self.sharded.stage}: shard {index} got {rows} of {self.shard_sizes[index]} rows")
            if rows == self.shard_sizes[index]:
                summaries.append(
                    self._write(index, pa.concat_tables(self.arrived.pop(index), promote_options="permissive"))
                )
        return pa.Table.from_pylist(summaries, SUMMARY_SCHEMA)

    def _write(self, index: int, shard: pa.Table) -> dict[str, Any]:
        kept, rejected = split_rejected(shard)
        kept = kept.drop_columns([c for c in PASS_COLUMNS if c in kept.column_names])
        scored = self.finish(kept) if kept.num_rows else None
        self.sharded.write(index, scored, self.columns(scored), rejected)
        tokens = (pc.sum(scored[self.tokens_column]).as_py() or 0) if scored is not None else 0
        return {"shard_index": index, "rows": shard.num_rows, "tokens": tokens, "seconds": self.seconds.pop(index)}
