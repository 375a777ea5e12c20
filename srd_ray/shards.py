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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from srd_ray import storage
from srd_ray.errors import DataError, RunDirError
from srd_ray.progress import Progress
from srd_ray.spec import PoolSpec
from srd_ray.storage import Location

log = logging.getLogger(__name__)

REJECTED_KEY = b"srd_ray.rejected"  # rows an engine rejected, in their shard's metadata


def split_into_shards(table: pa.Table, shard_rows: int) -> list[pa.Table]:
    """Fixed shards by input position: the same data and shard size always give the same shards. Each
    shard carries its ``shard_index`` column."""
    ordered = table.sort_by("input_position")
    return [
        ordered.slice(start, shard_rows).append_column(
            "shard_index",
            pa.array([start // shard_rows] * min(shard_rows, ordered.num_rows - start), pa.int32()),
        )
        for start in range(0, ordered.num_rows, shard_rows)
    ]


@dataclass(frozen=True)
class ShardedPass:
    stage: str  # for messages and --redo hints: "reflect", "teacher_signal"
    shards_dir: Location
    settings_key: bytes  # the Parquet schema metadata key the settings are stored under
    settings: dict[str, Any]

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
        storage.write_parquet(self.shard_path(index), rows)

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
        """Every shard as one table, in input order."""
        shards = [shard for shard in self.shards_dir.children() if shard.name.endswith(".parquet")]
        if not shards:
            raise FileNotFoundError(f"no {self.stage} shards in {self.shards_dir}")
        tables = []
        for path in shards:
            try:
                tables.append(path.read_parquet(columns=columns))
            except (pa.ArrowInvalid, OSError) as error:
                raise DataError(f"{path}: unreadable {self.stage} shard ({error}); delete it and rerun") from None
        table = pa.concat_tables(tables, promote_options="permissive")
        return table.sort_by("input_position") if "input_position" in table.column_names else table

    def rejected(self) -> list[dict[str, str]]:
        """Rows the engine rejected (set aside under ``data.on_bad_row: skip``), from every shard."""
        found = []
        for path in self.shards_dir.children():
            if path.name.endswith(".parquet"):
                metadata = path.parquet_file().schema_arrow.metadata or {}
                found += json.loads(metadata.get(REJECTED_KEY, b"[]"))
        return found

    def score(
        self, todo: list[pa.Table], actor: type, actor_kwargs: dict[str, Any], pool: PoolSpec, tokens_label: str
    ) -> dict[str, Any]:
        """Run ``actor`` (built once per actor with ``actor_kwargs``; called with whole shards, it writes them
        and returns one summary row each) over the shards in ``todo``, logging progress. Our own errors
        raised in actors surface as themselves."""
        from srd_ray.failures import reraise_srd_error
        from srd_ray.pools import map_with_engine_actors

        if not todo:
            return {"rows": 0, "tokens": 0, "busy_s": 0.0}
        dataset = map_with_engine_actors(todo, actor, actor_kwargs, pool, batch_size=None)
        with reraise_srd_error():
            total = sum(shard.num_rows for shard in todo)
            return follow_progress(self.stage, dataset.iter_rows(), total, tokens_label)

    def check_complete(self, expected_ids: Iterable[str], done: pa.Table) -> None:
        """Every input example_id done exactly once (or rejected): nothing lost, duplicated or foreign."""
        expected = set(expected_ids) - {row["example_id"] for row in self.rejected()}
        got = done["example_id"].to_pylist()
        duplicates = done.num_rows - len(set(got))
        missing, extra = expected - set(got), set(got) - expected
        if missing or extra or duplicates:
            raise DataError(
                f"{self.stage} shards hold {done.num_rows} rows for {len(expected)} inputs: {len(missing)} "
                f"missing, {len(extra)} not in the input, {duplicates} duplicated; rerun with --redo {self.stage}"
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
    ``{"rows", "tokens", "seconds"}`` record per shard."""
    done = {"rows": 0, "tokens": 0, "busy_s": 0.0}
    with Progress(stage, total_rows, "rows") as progress:
        for summary in summaries:
            done["rows"] += summary["rows"]
            done["tokens"] += summary["tokens"]
            done["busy_s"] += summary["seconds"]
            elapsed = max(time.perf_counter() - progress.started, 1e-9)
            progress.update(done["rows"], **{f"{tokens_label}/s": done["tokens"] / elapsed})
    return done


@dataclass(frozen=True)
class ShardScorer:
    """What an actor needs to turn shards into written, scored shards: the scoring function (Arrow in,
    Arrow out), the errors meaning "this row is rejected" (vs the engine failing), the output columns."""

    score: Callable[[pa.Table], pa.Table]
    row_errors: tuple[type[BaseException], ...]
    columns: Callable[[pa.Table | None], pa.Schema]
    tokens_column: str
    on_bad_row: str

    def __call__(self, sharded: ShardedPass, batch: pa.Table) -> pa.Table:
        """Score and write every shard in ``batch``; one summary row per shard."""
        summaries = []
        # A batch normally is one shard (one block); group anyway so shard files never mix.
        for index in sorted(set(batch["shard_index"].to_pylist())):
            started = time.perf_counter()
            rows = batch.filter(pc.equal(batch["shard_index"], index)).drop_columns(["shard_index"])
            scored, rejected = score_isolating_rows(rows, self.score, self.row_errors)
            check_rejected(sharded.stage, rejected, self.on_bad_row)
            sharded.write(index, scored, self.columns(scored), rejected)
            tokens = pc.sum(scored[self.tokens_column]).as_py() if scored is not None else 0
            summaries.append({"shard_index": index, "rows": rows.num_rows, "tokens": tokens or 0,
                              "seconds": time.perf_counter() - started})  # fmt: skip
        return pa.Table.from_pylist(summaries)
