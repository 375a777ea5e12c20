"""Reflect: the untrained student answers every training prompt and each pair is scored.

Signals per (prompt, reference) pair:
- ``rouge_l``: ROUGE-L F (stemmed) of the student's near-greedy answer against the reference(s); higher
  means easier;
- ``student_ce``: the student's mean token cross-entropy on the reference response, teacher-forced,
  response tokens only; lower means easier;
- ``teacher_ce`` (with ``reflect.teacher_ce``): the same for the teacher, for ranking variants.

Core: :func:`score_table` (Arrow in, Arrow out, any engine). Driver: :func:`run_reflect` splits the input
into fixed shards by input position and scores them on a Ray Data actor pool; each actor writes its shard
atomically with the settings that made it in the Parquet schema metadata, so an interrupted job resumes
with the shards it has not finished and never mixes shards made with other settings.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from srd_ray import storage
from srd_ray.engines import Engine, build_engine, engine_version, row_seed
from srd_ray.errors import DataError, RunDirError
from srd_ray.ray_errors import reraise_srd_error
from srd_ray.scoring import rouge_l
from srd_ray.spec import GenerationSpec, JobSpec, ModelSpec
from srd_ray.storage import Location, Place

log = logging.getLogger(__name__)

INPUT_FIELDS = [
    pa.field("example_id", pa.string()),
    pa.field("input_position", pa.int64()),
    pa.field("prompt", pa.string()),
    pa.field("references", pa.list_(pa.string())),
    pa.field("response", pa.string()),
]
SIGNAL_FIELDS = [
    pa.field("student_answer", pa.string()),
    pa.field("rouge_l", pa.float64()),
    pa.field("student_ce", pa.float64()),
    pa.field("teacher_ce", pa.float64()),  # null unless reflect.teacher_ce
    pa.field("response_tokens", pa.int32()),
    pa.field("generated_tokens", pa.int32()),
    pa.field("prompt_truncated", pa.bool_()),
]
SETTINGS_KEY = b"srd_ray.reflect"


def score_table(rows: pa.Table, engine: Engine, generation: GenerationSpec, teacher: Engine | None = None) -> pa.Table:
    """Add the student's answer and the difficulty signals to every row (order kept)."""
    prompts = rows["prompt"].to_pylist()
    responses = rows["response"].to_pylist()
    seeds = [row_seed(generation.seed, example_id) for example_id in rows["example_id"].to_pylist()]
    answers = engine.generate(prompts, generation, seeds)
    student = engine.response_cross_entropy(prompts, responses)
    teacher_ce = teacher.response_cross_entropy(prompts, responses).mean if teacher else [None] * rows.num_rows
    references = rows["references"].to_pylist()
    scores = [rouge_l(answer, refs) for answer, refs in zip(answers.texts, references, strict=True)]
    signals = [
        answers.texts,
        scores,
        student.mean,
        teacher_ce,
        student.tokens,
        answers.generated_tokens,
        answers.prompt_truncated,
    ]
    for field, values in zip(SIGNAL_FIELDS, signals, strict=True):
        rows = rows.append_column(field, pa.array(values, field.type))
    return rows


def shard_schema(rows: pa.Table, settings: dict[str, Any]) -> pa.Schema:
    """The fixed input and signal columns first, then the data's passthrough columns, plus the settings."""
    fixed = {field.name for field in INPUT_FIELDS + SIGNAL_FIELDS}
    passthrough = [field for field in rows.schema if field.name not in fixed]
    return pa.schema(
        INPUT_FIELDS + SIGNAL_FIELDS + passthrough, metadata={SETTINGS_KEY: json.dumps(settings, sort_keys=True)}
    )


def reflect_settings(spec: JobSpec, engine: str, teacher: ModelSpec | None) -> dict[str, Any]:
    """Everything that determines a shard's scores: shards made with other settings must not be mixed."""
    return {
        "engine": engine,
        # LoRA settings shape training only: the untrained student reflects the same with or without them.
        "student": spec.models.student.model_dump(mode="json", exclude={"lora"}),
        "teacher": teacher.model_dump(mode="json") if teacher else None,
        "generation": spec.reflect.generation.model_dump(mode="json"),
        "max_prompt_tokens": spec.data.max_prompt_tokens,
        "max_response_tokens": spec.data.max_response_tokens,
        # vLLM has no such option; both engines apply it with the same rule (see srd_ray.engines).
        "no_repeat_ngram": "ban on prompt + answer n-grams, applied as a logits processor",
    }


def shard_path(shards_dir: Location, index: int) -> Location:
    return shards_dir / f"shard-{index:05d}.parquet"


class ReflectActor:
    """Engines are loaded once per actor; each call scores whole shards and writes them (idempotent)."""

    def __init__(self, spec: JobSpec, settings: dict[str, Any], teacher: ModelSpec | None, shards_dir: str) -> None:
        self.spec = spec
        self.settings = settings
        self.shards_dir = Location.of(shards_dir)
        reflect = self.spec.reflect
        engine_options = {
            "max_new_tokens": reflect.generation.max_new_tokens,
            "batch_size": reflect.batch_size,
            "num_gpus": reflect.num_gpus_per_actor,
            "vllm": reflect.vllm,
        }
        self.engine = build_engine(settings["engine"], self.spec.models.student, self.spec.data, **engine_options)
        self.teacher = None
        if teacher is not None:
            # Teacher CE needs a forward pass only: transformers does that well on any device.
            self.teacher = build_engine("transformers", teacher, self.spec.data, **engine_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = []
        # A batch normally is one shard (one block); group anyway so shard files never mix.
        for index in sorted(set(batch["shard_index"].to_pylist())):
            started = time.perf_counter()
            rows = batch.filter(pc.equal(batch["shard_index"], index)).drop_columns(["shard_index"])
            scored = score_table(rows, self.engine, self.spec.reflect.generation, self.teacher)
            schema = shard_schema(scored, self.settings)
            scored = scored.select(schema.names).cast(schema)
            storage.write_parquet(shard_path(self.shards_dir, index), scored)
            summaries.append(
                {
                    "shard_index": index,
                    "rows": scored.num_rows,
                    "generated_tokens": pc.sum(scored["generated_tokens"]).as_py() or 0,
                    "seconds": time.perf_counter() - started,
                }
            )
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


def check_existing_shard(path: Place, settings: dict[str, Any]) -> None:
    """A finished shard is reused only if it is readable and was made with exactly these settings."""
    try:
        schema = Location.of(path).parquet_file().schema_arrow
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: unreadable reflect shard ({error}); delete it and rerun to recompute it") from None
    made_with = json.loads((schema.metadata or {}).get(SETTINGS_KEY, b"{}"))
    if made_with != settings:
        changed = sorted(key for key in settings.keys() | made_with.keys() if settings.get(key) != made_with.get(key))
        raise RunDirError(
            f"{path} was made with other reflect settings ({', '.join(changed)} differ); rerun with "
            "--redo reflect to replace every shard, or use another run.name"
        )


def run_reflect(
    spec: JobSpec, table: pa.Table, stage_dir: Place, *, engine: str, teacher: ModelSpec | None
) -> dict[str, Any]:
    """Score every row of ``table`` into ``stage_dir/shards``; reuses shards already written."""
    import ray

    started = time.perf_counter()
    settings = reflect_settings(spec, engine, teacher)
    shards_dir = Location.of(stage_dir) / "shards"
    storage.remove_partials(shards_dir)
    finished = {shard.name for shard in shards_dir.children()}
    shards = split_into_shards(table, spec.reflect.shard_rows)
    todo = []
    for shard in shards:
        path = shard_path(shards_dir, shard["shard_index"][0].as_py())
        if path.name in finished:
            check_existing_shard(path, settings)
        else:
            todo.append(shard)
    log.info(
        "reflect: %d rows in %d shards, %d already done; engine %s", table.num_rows, len(shards),
        len(shards) - len(todo), engine,
    )  # fmt: skip
    progress = {"rows": 0, "generated_tokens": 0, "busy_s": 0.0}
    if todo:
        dataset = ray.data.from_arrow(todo).map_batches(
            ReflectActor,
            fn_constructor_kwargs={
                "spec": spec,
                "settings": settings,
                "teacher": teacher,
                "shards_dir": str(shards_dir),
            },
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(spec.reflect.concurrency, len(todo))),
            num_cpus=spec.reflect.num_cpus_per_actor,
            num_gpus=spec.reflect.num_gpus_per_actor,
        )
        with reraise_srd_error():
            progress = _follow_progress(dataset, total_rows=sum(s.num_rows for s in todo))
    scored = read_scored(stage_dir)
    check_complete(table, scored)
    wall = time.perf_counter() - started
    return {
        "rows": scored.num_rows,
        "shards": len(shards),
        "shards_reused": len(shards) - len(todo),
        "rows_scored": progress["rows"],
        "generated_tokens": progress["generated_tokens"],
        "rows_per_s": round(progress["rows"] / wall, 2),
        "generated_tokens_per_s": round(progress["generated_tokens"] / wall, 1),
        # Seconds actors spent scoring shards (engine loading and Ray scheduling excluded), summed over actors.
        "actor_busy_s": round(progress["busy_s"], 2),
        **settings,
        "engine_version": engine_version(engine),
        "mean_rouge_l": pc.mean(scored["rouge_l"]).as_py(),
        "mean_student_ce": pc.mean(scored["student_ce"]).as_py(),
        "mean_teacher_ce": pc.mean(scored["teacher_ce"]).as_py(),
        "prompts_truncated": pc.sum(scored["prompt_truncated"]).as_py(),
    }


def _follow_progress(dataset: Any, total_rows: int) -> dict[str, Any]:
    """One log line per finished shard: rows done, rows/s, generated tokens/s and ETA."""
    started = time.perf_counter()
    done = {"rows": 0, "generated_tokens": 0, "busy_s": 0.0}
    for summary in dataset.iter_rows():
        done["rows"] += summary["rows"]
        done["generated_tokens"] += summary["generated_tokens"]
        done["busy_s"] += summary["seconds"]
        elapsed = time.perf_counter() - started
        rate = done["rows"] / elapsed if elapsed > 0 else 0.0
        eta = (total_rows - done["rows"]) / rate if rate > 0 else float("inf")
        log.info(
            "reflect: %d/%d rows, %.1f rows/s, %.0f generated tokens/s, ETA %.0fs",
            done["rows"], total_rows, rate, done["generated_tokens"] / elapsed, eta,
        )  # fmt: skip
    return done


def check_complete(table: pa.Table, scored: pa.Table) -> None:
    """Every input example_id scored exactly once: nothing lost, nothing duplicated, nothing foreign."""
    expected = set(table["example_id"].to_pylist())
    got = scored["example_id"].to_pylist()
    duplicates = scored.num_rows - len(set(got))
    missing, extra = expected - set(got), set(got) - expected
    if missing or extra or duplicates:
        raise DataError(
            f"reflect shards hold {scored.num_rows} rows for {len(expected)} inputs: {len(missing)} missing, "
            f"{len(extra)} not in the input, {duplicates} duplicated; rerun with --redo reflect"
        )


def read_scored(stage_dir: Place) -> pa.Table:
    """All scored shards of a reflect stage as one table, in input order."""
    shards_dir = Location.of(stage_dir) / "shards"
    shards = [shard for shard in shards_dir.children() if shard.name.endswith(".parquet")]
    if not shards:
        raise FileNotFoundError(f"no reflect shards in {shards_dir}")
    tables = []
    for path in shards:
        try:
            tables.append(path.read_parquet())
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"{path}: unreadable reflect shard ({error}); delete it and rerun reflect") from None
    return pa.concat_tables(tables, promote_options="permissive").sort_by("input_position")
