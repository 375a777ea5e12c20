"""Dynamic reflection (``rank.refresh: every_stage``): between curriculum stages, the student as trained so
far re-reflects the rows not yet admitted, and the next bucket is the easiest of them.

Stage 0 trains on the initial rank's bucket 0. Before stage s (s >= 1), the student after stage s - 1
scores every row not in buckets 0..s-1 through the same reflect stage (Ray Data actors, engine and
settings); those rows are ranked by the same fusion, and the easiest of them become bucket s, as many as
the initial ranking put in bucket s (N // num_buckets of the N ranked rows). With a stratified ranking
(``rank.stratify_by`` / ``stratify_clusters``) this holds per stratum: each stratum's easiest remaining
rows are admitted, as many as its initial bucket s held, so a task the student finds hard is still
admitted stage by stage. Rows never admitted are the ones dropped.

Each stage trains as its own Ray Train job over the same checkpoint folder, so stage s resumes from the
checkpoint stage s - 1 ended with (optimizer reset, step counts and RNG streams carried on). In the
distill folder:

- ``after_stage_<s>/``: the student after stage s (``save_pretrained``), written when stage s ends;
- ``refresh_<s>/shards/``: the re-reflection before stage s (resumable per shard, fingerprinted with the
  model that scored it), and ``refresh_<s>/rank/``: bucket s and its manifest (how the order changed,
  what the refresh cost);
- ``model/``: the final student, as without refresh.

All are written atomically, so a rerun skips every stage whose ``after_stage`` folder exists, reuses every
refresh whose manifest exists, and resumes a refresh that was interrupted from its finished shards: a row
is admitted once, by the refresh that first wrote its bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from srd_ray.distill.curriculum import bucket_name
from srd_ray.distill.driver import run_training, trained_model
from srd_ray.distill.worker import TrainingJob
from srd_ray.encoding import training_text
from srd_ray.rank import MANIFEST, bucket_dir, bucket_quotas, read_manifest, read_ranked, run_refresh_rank
from srd_ray.spec import JobSpec, ModelSpec
from srd_ray.storage import Location
from srd_ray.strata import resolve_strata, task_column

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reflector:
    """How a refresh scores rows: the run's spec, its reflect engine and (for teacher_ce) its teacher."""

    spec: JobSpec
    engine: str
    teacher: ModelSpec | None

    def with_student(self, model_dir: Location) -> JobSpec:
        """The spec with the trained student in place of the initial one (merged: no LoRA adapters)."""
        student = self.spec.models.student.model_copy(update={"path": str(model_dir), "lora": None})
        return self.spec.model_copy(update={"models": self.spec.models.model_copy(update={"student": student})})


def after_stage(stage_dir: Location, stage: int) -> Location:
    return stage_dir / f"after_stage_{stage}"


def refresh_dir(stage_dir: Location, stage: int) -> Location:
    return stage_dir / f"refresh_{stage}"


def train_with_refresh(
    job: TrainingJob,
    reflector: Reflector,
    rank_dir: Location,
    train_rows: pa.Table,
    stage_dir: Location,
) -> dict[str, Any]:
    """Train ``job``'s stages one Ray Train job at a time, refreshing the next bucket between them."""

    initial = read_ranked(rank_dir)
    spec = reflector.spec  # rank.stratify_by auto: the refreshes stratify as the initial ranking did
    rank = resolve_strata(spec.rank, initial, task_column(spec.data.train.fields.task, initial.column_names))
    reflector = dataclasses.replace(reflector, spec=spec.model_copy(update={"rank": rank}))
    quotas = bucket_quotas(initial, rank.strata_column, rank.num_buckets)
    buckets = {0: training_text(initial.filter(pc.equal(initial["bucket"], 0)))}
    planned = {bucket_name(b): sum(quota[b] for quota in quotas.values()) for b in range(len(job.plan))}
    refreshes, wall, summary = [], 0.0, {}
    for stage in job.plan:
        index, last = stage.index, stage.index + 1 == len(job.plan)
        if index > 0:
            admitted = pa.concat_tables(buckets.values())["example_id"]
            buckets[index], record = refreshed_bucket(
                reflector, initial, admitted, train_rows, stage_dir, index, quotas
            )
            refreshes.append(record)
        model_dir = trained_model(stage_dir) if last else after_stage(stage_dir, index)
        if not last and model_dir.exists():
            log.info("distill: stage %d already trained (%s)", index, model_dir)
            continue
        datasets = {bucket_name(b): table for b, table in buckets.items()}
        segment = dataclasses.replace(job, last_stage=index, planned_rows=tuple(planned.items()))
        summary = run_training(segment, datasets, stage_dir, rows=planned, model_dir=model_dir)
        wall += summary["train_wall_s"]
    return {**summary, "train_wall_s": round(wall, 2), "refresh": refreshes, "refresh_cost": refresh_cost(refreshes)}


def refreshed_bucket(
    reflector: Reflector,
    initial: pa.Table,
    admitted: pa.ChunkedArray,
    train_rows: pa.Table,
    stage_dir: Location,
    stage: int,
    quotas: dict[Any, list[int]],
) -> tuple[pa.Table, dict[str, Any]]:
    """Bucket ``stage``, refreshed by the student after stage - 1 (or as an earlier run refreshed it)."""
    folder = refresh_dir(stage_dir, stage)
    rank_folder = folder / "rank"
    if not (rank_folder / MANIFEST).exists():
        from srd_ray.reflect import read_scored, run_reflect

        model_dir = after_stage(stage_dir, stage - 1)
        left = pc.invert(pc.is_in(initial["example_id"], admitted))
        candidates = train_rows.filter(pc.is_in(train_rows["example_id"], initial["example_id"].filter(left)))
        log.info(
            "refresh before stage %d: %d rows not yet admitted, scored by %s", stage, candidates.num_rows, model_dir
        )
        started = time.perf_counter()
        spec = reflector.with_student(model_dir)
        reflected = run_reflect(spec, candidates, folder, engine=reflector.engine, teacher=reflector.teacher)
        cost = {"reflect_wall_s": round(time.perf_counter() - started, 2), "after_stage": stage - 1,
                **{key: reflected[key] for key in ("rows_scored", "generated_tokens", "shards_reused")}}  # fmt: skip
        run_refresh_rank(spec.rank, read_scored(folder), initial, rank_folder, stage, quotas, extra=cost)
    table = training_text(bucket_dir(rank_folder, stage).read_parquet())
    return table, read_manifest(rank_folder)


def refresh_cost(refreshes: list[dict[str, Any]]) -> dict[str, Any]:
    """What the refreshes added to the run: rows re-reflected, tokens generated, wall time."""
    return {
        "refreshes": len(refreshes),
        "rows_scored": sum(r["rows_scored"] for r in refreshes),
        "generated_tokens": sum(r["generated_tokens"] for r in refreshes),
        "reflect_wall_s": round(sum(r["reflect_wall_s"] for r in refreshes), 2),
    }
