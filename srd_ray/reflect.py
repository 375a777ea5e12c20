"""Reflect: the untrained student answers every training prompt and each pair is scored.

Two difficulty signals per (prompt, reference) pair:
- ``rouge_l``: ROUGE-L F (stemmed) of the student's near-greedy answer against the reference(s); higher
  means easier;
- ``student_ce``: the student's mean token cross-entropy on the reference response, teacher-forced,
  response tokens only; lower means easier.

Core: :func:`score_table` (Arrow in, Arrow out, any engine). Driver: :func:`run_reflect` splits the input
into fixed shards by input position, scores them on a Ray Data actor pool, and each actor writes its
shard atomically, so an interrupted job resumes with the shards it has not finished.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from srd_ray import atomic
from srd_ray.engines import Engine, batch_seed, build_engine
from srd_ray.scoring import rouge_l
from srd_ray.spec import GenerationSpec, JobSpec

log = logging.getLogger(__name__)

SIGNAL_FIELDS = [
    pa.field("student_answer", pa.string()),
    pa.field("rouge_l", pa.float64()),
    pa.field("student_ce", pa.float64()),
    pa.field("response_tokens", pa.int32()),
    pa.field("prompt_truncated", pa.bool_()),
]


def score_table(rows: pa.Table, engine: Engine, generation: GenerationSpec, batch_size: int) -> pa.Table:
    """Add the student's answer and both difficulty signals to every row (order kept)."""
    answers: list[str] = []
    truncated: list[bool] = []
    ces: list[float] = []
    counts: list[int] = []
    for start in range(0, rows.num_rows, batch_size):
        batch = rows.slice(start, batch_size)
        prompts = batch["prompt"].to_pylist()
        seed = batch_seed(generation.seed, batch["example_id"][0].as_py())
        batch_answers, batch_truncated = engine.generate(prompts, generation, seed)
        batch_ces, batch_counts = engine.response_cross_entropy(prompts, batch["response"].to_pylist())
        answers += batch_answers
        truncated += batch_truncated
        ces += batch_ces
        counts += batch_counts
    references = rows["references"].to_pylist()
    scores = [rouge_l(answer, refs) for answer, refs in zip(answers, references, strict=True)]
    signals = [answers, scores, ces, counts, truncated]
    for field, values in zip(SIGNAL_FIELDS, signals, strict=True):
        rows = rows.append_column(field, pa.array(values, field.type))
    return rows


def shard_path(shards_dir: Path, index: int) -> Path:
    return shards_dir / f"shard-{index:05d}.parquet"


class ReflectActor:
    """One engine per actor; each call scores whole shards and writes them (idempotent on retry)."""

    def __init__(self, spec_payload: dict[str, Any], shards_dir: str) -> None:
        self.spec = JobSpec.model_validate(spec_payload)
        self.shards_dir = Path(shards_dir)
        self.engine = build_engine(
            self.spec.reflect.engine,
            self.spec.models.student,
            max_prompt_tokens=self.spec.data.max_prompt_tokens,
            max_response_tokens=self.spec.data.max_response_tokens,
            num_gpus=self.spec.reflect.num_gpus_per_actor,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = []
        # A batch normally is one shard (one block); group anyway so shard files never mix.
        for index in sorted(set(batch["shard_index"].to_pylist())):
            started = time.perf_counter()
            rows = batch.filter(pc.equal(batch["shard_index"], index)).drop_columns(["shard_index"])
            scored = score_table(rows, self.engine, self.spec.reflect.generation, self.spec.reflect.batch_size)
            atomic.write_parquet(shard_path(self.shards_dir, index), scored)
            summaries.append({"shard_index": index, "rows": scored.num_rows, "seconds": time.perf_counter() - started})
        return pa.Table.from_pylist(summaries)


def split_into_shards(table: pa.Table, shard_rows: int) -> list[pa.Table]:
    """Fixed shards by input position: the same data and shard size always give the same shards."""
    ordered = table.sort_by("input_position")
    return [
        ordered.slice(start, shard_rows).append_column(
            "shard_index",
            pa.array([start // shard_rows] * min(shard_rows, ordered.num_rows - start), pa.int32()),
        )
        for start in range(0, ordered.num_rows, shard_rows)
    ]


def run_reflect(spec: JobSpec, table: pa.Table, stage_dir: Path) -> dict[str, Any]:
    """Score every row of ``table`` into ``stage_dir/shards``; skips shards already written."""
    import ray

    shards_dir = stage_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    atomic.remove_partials(shards_dir)
    shards = split_into_shards(table, spec.reflect.shard_rows)
    todo = [s for s in shards if not shard_path(shards_dir, s["shard_index"][0].as_py()).exists()]
    log.info("reflect: %d rows in %d shards, %d already done", table.num_rows, len(shards), len(shards) - len(todo))
    if todo:
        dataset = ray.data.from_arrow(todo).map_batches(
            ReflectActor,
            fn_constructor_kwargs={
                "spec_payload": spec.model_dump(mode="json"),
                "shards_dir": str(shards_dir),
            },
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(spec.reflect.concurrency, len(todo))),
            num_cpus=spec.reflect.num_cpus_per_actor,
            num_gpus=spec.reflect.num_gpus_per_actor,
        )
        _follow_progress(dataset, total_rows=sum(s.num_rows for s in todo))
    scored = read_scored(stage_dir)
    missing = set(table["example_id"].to_pylist()) - set(scored["example_id"].to_pylist())
    if missing or scored.num_rows != table.num_rows:
        raise RuntimeError(f"reflect: {len(missing)} rows missing after scoring; rerun to finish them")
    return {
        "rows": scored.num_rows,
        "shards": len(shards),
        "engine": spec.reflect.engine,
        "student": spec.models.student.path,
        "generation": spec.reflect.generation.model_dump(),
        "mean_rouge_l": pc.mean(scored["rouge_l"]).as_py(),
        "mean_student_ce": pc.mean(scored["student_ce"]).as_py(),
        "prompts_truncated": pc.sum(scored["prompt_truncated"]).as_py(),
    }


def _follow_progress(dataset: Any, total_rows: int) -> None:
    started = time.perf_counter()
    done = 0
    for summary in dataset.iter_rows():
        done += summary["rows"]
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total_rows - done) / rate if rate > 0 else float("inf")
        log.info("reflect: %d/%d rows, %.1f rows/s, ETA %.0fs", done, total_rows, rate, eta)


def read_scored(stage_dir: Path) -> pa.Table:
    """All scored shards of a reflect stage as one table, in input order."""
    shards = sorted((stage_dir / "shards").glob("shard-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no reflect shards in {stage_dir / 'shards'}")
    return pa.concat_tables([pq.read_table(path) for path in shards]).sort_by("input_position")
