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

import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from srd_ray.data import row_positions
from srd_ray.devices import uses_cuda
from srd_ray.encoding import prompts_of
from srd_ray.engines import Engine, build_engine, engine_version, row_seed
from srd_ray.errors import ModelError
from srd_ray.reflect_columns import SIGNAL_FIELDS, add_rouge, shard_columns
from srd_ray.shards import ShardedPass, ShardEngine, ShardWriter, split_into_shards
from srd_ray.spec import GenerationSpec, JobSpec, ModelSpec
from srd_ray.storage import Location, Place

log = logging.getLogger(__name__)

SETTINGS_KEY = b"srd_ray.reflect"


def engine_signals(rows: pa.Table, engine: Engine, generation: GenerationSpec, teacher: Engine | None) -> pa.Table:
    """The engine's part: the student's answer and cross-entropies for every row (order kept)."""
    prompts = prompts_of(rows)
    responses = rows["response"].to_pylist()
    seeds = [row_seed(generation.seed, example_id) for example_id in rows["example_id"].to_pylist()]
    answers, student = engine.reflect(prompts, responses, generation, seeds)
    teacher_ce = teacher.response_cross_entropy(prompts, responses).mean if teacher else [None] * rows.num_rows
    columns = {
        "student_answer": answers.texts,
        "student_ce": student.mean,
        "teacher_ce": teacher_ce,
        "response_tokens": student.tokens,
        "generated_tokens": answers.generated_tokens,
        "prompt_truncated": answers.prompt_truncated,
    }
    types = {field.name: field.type for field in SIGNAL_FIELDS}
    for name, values in columns.items():
        rows = rows.append_column(pa.field(name, types[name]), pa.array(values, types[name]))
    return rows


def score_table(rows: pa.Table, engine: Engine, generation: GenerationSpec, teacher: Engine | None = None) -> pa.Table:
    """Add the student's answer and the difficulty signals to every row (order kept): both parts at once."""
    scored = add_rouge(engine_signals(rows, engine, generation, teacher))
    return scored.select([*rows.column_names, *(f.name for f in SIGNAL_FIELDS)])


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


def reflect_pass(spec: JobSpec, stage_dir: Place, engine: str, teacher: ModelSpec | None) -> ShardedPass:
    settings = reflect_settings(spec, engine, teacher)
    return ShardedPass("reflect", Location.of(stage_dir) / "shards", SETTINGS_KEY, settings)


class ReflectEngine(ShardEngine):
    """A reflect actor: the student's engine (and the teacher's, for teacher_ce), loaded once."""

    def __init__(self, spec: JobSpec, engine: str, teacher: ModelSpec | None) -> None:
        reflect = spec.reflect
        options = {"max_new_tokens": reflect.generation.max_new_tokens, "vllm": spec.engine.vllm}
        # Teacher CE needs a forward pass only: transformers does that well on any device. It loads first, so
        # that a vLLM student on the same GPU is given only the memory the teacher leaves (review F7).
        teacher_engine = build_engine("transformers", teacher, spec.data, reflect, **options) if teacher else None
        if teacher_engine is not None and engine == "vllm" and uses_cuda(reflect.num_gpus_per_actor):
            free, total = torch.cuda.mem_get_info()
            share = memory_fraction_beside(spec.engine.vllm.gpu_memory_utilization, free, total)
            options["vllm"] = spec.engine.vllm.model_copy(update={"gpu_memory_utilization": share})
        student = build_engine(engine, spec.models.student, spec.data, reflect, **options)
        super().__init__(
            "reflect", lambda rows: engine_signals(rows, student, reflect.generation, teacher_engine),
            student.row_errors, spec.data.on_bad_row,
        )  # fmt: skip


def memory_fraction_beside(configured: float, free_bytes: int, total_bytes: int, margin_gib: float = 1.0) -> float:
    """vLLM's ``gpu_memory_utilization`` on a GPU another model already holds part of: vLLM takes that
    fraction of the *whole* GPU and refuses to start when less is free. At most what is free, less a
    margin for the other model's activations; at most what was configured."""
    available = (free_bytes - margin_gib * 2**30) / total_bytes
    if available < 0.05:
        raise ModelError(
            f"reflect.teacher_ce: the teacher leaves {free_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB free "
            "on the reflect GPU, too little for the vLLM student beside it; give reflect actors more GPU memory "
            "(reflect.num_gpus_per_actor) or rank without teacher_ce"
        )
    return min(configured, available)


def run_reflect(
    spec: JobSpec, table: pa.Table, stage_dir: Place, *, engine: str, teacher: ModelSpec | None
) -> dict[str, Any]:
    """Score every row of ``table`` into ``stage_dir/shards``; reuses shards already written."""
    started = time.perf_counter()
    sharded = reflect_pass(spec, stage_dir, engine, teacher)
    shards = split_into_shards(table, spec.reflect.shard_rows)
    todo = sharded.pending(shards)
    log.info(
        "reflect: %d rows in %d shards, %d already done; engine %s", table.num_rows, len(shards),
        len(shards) - len(todo), engine,
    )  # fmt: skip
    writer = ShardWriter(sharded, add_rouge, shard_columns, "generated_tokens")
    engine_kwargs = {"spec": spec, "engine": engine, "teacher": teacher}
    progress = sharded.score(todo, ReflectEngine, engine_kwargs, spec.reflect, writer, "generated tokens")
    # Only what the check and the summary need: the driver never holds every prompt and answer at once.
    scored = sharded.read(columns=["example_id", "rouge_l", "student_ce", "teacher_ce", "prompt_truncated"])
    sharded.check_complete(table["example_id"], scored)
    wall = time.perf_counter() - started
    return {
        "rows": scored.num_rows,
        "shards": len(shards),
        "shards_reused": len(shards) - len(todo),
        "rows_scored": progress["rows"],
        "generated_tokens": progress["tokens"],
        "rows_per_s": round(progress["rows"] / wall, 2),
        "generated_tokens_per_s": round(progress["tokens"] / wall, 1),
        # Seconds actors spent scoring shards (engine loading and Ray scheduling excluded), summed over actors.
        "actor_busy_s": round(progress["busy_s"], 2),
        **sharded.settings,
        "engine_version": engine_version(engine),
        "mean_rouge_l": pc.mean(scored["rouge_l"]).as_py(),
        "mean_student_ce": pc.mean(scored["student_ce"]).as_py(),
        "mean_teacher_ce": pc.mean(scored["teacher_ce"]).as_py(),
        "prompts_truncated": pc.sum(scored["prompt_truncated"]).as_py(),
        "rejected_rows": sharded.rejected(),
    }


def read_scored(stage_dir: Place, data: pa.Table | None = None) -> pa.Table:
    """All scored shards of a reflect stage as one table, in input order. Given ``data``, the training rows
    the shards were made from, only the columns reflect added (answers, scores) are read from the shards;
    the data's own columns (prompt, references, response, ...) are ``data``'s arrays themselves when every
    row was scored (as usual; otherwise taken from it), so the driver holds the text once, not twice."""
    sharded = ShardedPass("reflect", Location.of(stage_dir) / "shards", SETTINGS_KEY, {})
    if data is None:
        return sharded.read()
    schema = sharded.stored_schema()
    added = sharded.read(
        columns=[name for name in schema.names if name == "example_id" or name not in data.column_names]
    )
    same_rows = added.num_rows == data.num_rows and added["example_id"].equals(data["example_id"])
    source = data if same_rows else data.take(row_positions(data, added["example_id"], "the reflect shards", "reflect"))
    columns = [added[field.name] if field.name in added.column_names else source[field.name].cast(field.type)
               for field in schema]  # fmt: skip
    return pa.Table.from_arrays(columns, schema=schema)
