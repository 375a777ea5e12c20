"""Teacher signal: the teacher's top-k distribution at every response token, computed once.

Off-policy KD trains on fixed references, so the teacher's forward pass over a row is the same in every
epoch of every stage. This stage runs it once per row the distillation will use (the kept rank buckets,
or every row for ``curriculum: none``, plus the held-out rows of the KD metric), as a Ray Data pass like
reflection: actors holding one teacher each (a GPU each where there are GPUs) score fixed shards and
write them atomically, with the settings that made them in the schema metadata. Distill workers then read
these columns with their rows and load no teacher at all.

Per row (keyed by ``example_id``), for each of its ``num_tokens`` response tokens: the ``k`` most likely
token ids (int32), their log-probabilities at T = 1 (``teacher_signal.logprob_dtype``, float16 by default)
and the log of the mass outside them (float32); and for each temperature T ≠ 1 of the distill stages, the
log of the tail's tempered mass Σ_tail p^(1/T) (float32), which re-tempering the top k cannot recover:
at T = 2 a tail of many small probabilities holds far more tempered mass than its T = 1 mass suggests.
Rows are tokenized exactly as training does, with either engine (the transformers forward pass, whose
tempered tails are exact, or vLLM's ``prompt_logprobs``, whose tempered tails are extrapolated).

Core: :func:`score_signal` (Arrow in, Arrow out, any engine); driver: :func:`run_teacher_signal`;
training reads :func:`read_signal` after :func:`check_signal`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from srd_ray.encoding import RowFormat, prompts_of, training_text
from srd_ray.engines import Engine, build_engine, engine_version
from srd_ray.errors import DataError
from srd_ray.shards import ROW_GROUP_ROWS, ShardedPass, ShardEngine, ShardWriter, split_into_shards
from srd_ray.signals import (  # noqa: F401 (TopK, signals_by_id re-exported)
    ADAPTIVE_COLUMN,
    SIGNAL_COLUMNS,
    TopK,
    signal_columns,
    signals_by_id,
    tail_temperatures,
)
from srd_ray.spec import DataSpec, JobSpec, ModelSpec, TeacherSignalSpec
from srd_ray.storage import Location, Place

log = logging.getLogger(__name__)

SETTINGS_KEY = b"srd_ray.teacher_signal"
LOGPROB_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
# Above this mean tempered mass outside the top k, the pass warns. Measured on the healed SmolLM2 pair
# (bench/results/teacher_signal_tail_trained.md, srd_evidence_healed.md): at T 2, k 64 left 28 % outside
# (fkl gradient error 5.4 %, demo ROUGE-L -1.2 vs online) and k 1024 left 16 % (1.5 %, -0.96).
TAIL_MASS_WARNING = 0.2


def signal_fields(logprob_dtype: str, adaptive: bool = False) -> list[pa.Field]:
    fields = [
        pa.field("example_id", pa.string()),
        pa.field("input_position", pa.int64()),
        pa.field("num_tokens", pa.int32()),
        pa.field("topk_ids", pa.list_(pa.int32())),  # num_tokens * k (adaptive: sum of topk_counts), token by token
        pa.field("topk_logprobs", pa.list_(LOGPROB_TYPES[logprob_dtype])),  # as topk_ids
        pa.field("tail_logprob", pa.list_(pa.float32())),  # num_tokens
        pa.field("tempered_tail_logprobs", pa.list_(pa.float32())),  # num_tokens * temperatures
    ]
    return fields + ([pa.field("topk_counts", pa.list_(pa.int16()))] if adaptive else [])  # num_tokens


def bytes_per_token(k: float, logprob_dtype: str, temperatures: int = 0, adaptive: bool = False) -> float:
    """Uncompressed storage of one response token's signal (``k``: ids per token, a mean if adaptive)."""
    return k * (4 + LOGPROB_TYPES[logprob_dtype].byte_width) + 4 * (1 + temperatures) + 2 * adaptive


def score_signal(
    rows: pa.Table, engine: Engine, k: int, logprob_dtype: str, temperatures: tuple[float, ...] = (),
    coverage: float | None = None,
) -> pa.Table:  # fmt: skip
    """The signal columns for ``rows`` (example_id, input_position, prompt, response), order kept. With
    ``coverage`` (adaptive k, at most ``k``) each token's kept ids only, and their count."""
    prompts, responses = prompts_of(rows), rows["response"].to_pylist()
    extra = {"coverage": coverage} if coverage is not None else {}
    signals = engine.response_topk(prompts, responses, k, temperatures, **extra)
    # float16 has no room below -65504: clamp there (a probability of e^-65504 is zero in any case).
    floor = -6e4 if logprob_dtype == "float16" else -np.inf
    kept = [_kept(s) for s in signals]
    columns = {
        "example_id": rows["example_id"],
        "input_position": rows["input_position"],
        "num_tokens": [len(s.tail) for s in signals],
        "topk_ids": [s.ids[mask] for s, mask in zip(signals, kept, strict=True)],
        "topk_logprobs": [
            np.maximum(s.logprobs[mask], floor).astype(logprob_dtype) for s, mask in zip(signals, kept, strict=True)
        ],
        "tail_logprob": [s.tail for s in signals],
        "tempered_tail_logprobs": [s.tempered_tails.reshape(-1) for s in signals],
    }
    if coverage is not None:
        columns["topk_counts"] = [s.counts for s in signals]
    return pa.table(columns, schema=pa.schema(signal_fields(logprob_dtype, coverage is not None)))


def _kept(signal: TopK) -> np.ndarray:
    """Which of a row's [tokens, k] entries are ids kept (not padding), in row-major order."""
    if signal.counts is None:
        return np.ones(signal.ids.shape, dtype=bool)
    return np.arange(signal.ids.shape[1]) < signal.counts[:, None]


def signal_settings(spec: JobSpec, teacher: ModelSpec, engine: str) -> dict[str, Any]:
    """Everything that determines a shard's signal: shards made with other settings are never mixed."""
    settings = spec.teacher_signal
    adaptive = {"coverage": settings.coverage, "max_k": settings.max_k} if settings.k == "adaptive" else {}
    return {
        "engine": engine,
        "teacher": teacher.model_dump(mode="json"),
        "k": settings.k,
        **adaptive,
        "logprob_dtype": spec.teacher_signal.logprob_dtype,
        "tail_temperatures": list(tail_temperatures(spec.distill.stages)),
        "max_prompt_tokens": spec.data.max_prompt_tokens,
        "max_response_tokens": spec.data.max_response_tokens,
    }


def signal_pass(stage_dir: Place, settings: dict[str, Any]) -> ShardedPass:
    return ShardedPass("teacher_signal", Location.of(stage_dir) / "shards", SETTINGS_KEY, settings, ROW_GROUP_ROWS)


class SignalEngine(ShardEngine):
    """A teacher-pass actor: one teacher, loaded once."""

    def __init__(self, spec: JobSpec, teacher: ModelSpec, engine: str) -> None:
        settings = spec.teacher_signal
        model = build_engine(
            engine, teacher, spec.data, settings, max_new_tokens=1, vllm=spec.engine.vllm,
            max_logprobs=settings.largest_k,
        )  # fmt: skip
        temperatures = tail_temperatures(spec.distill.stages)

        def score(rows: pa.Table) -> pa.Table:
            return score_signal(rows, model, settings.largest_k, settings.logprob_dtype, temperatures,
                                settings.coverage_or_none)  # fmt: skip

        super().__init__("teacher_signal", score, model.row_errors, spec.data.on_bad_row)


def run_teacher_signal(
    spec: JobSpec, rows: pa.Table, stage_dir: Place, *, teacher: ModelSpec, engine: str
) -> dict[str, Any]:
    """Score ``rows`` (example_id, prompt, response; duplicates dropped) into ``stage_dir/shards``,
    reusing shards already written."""
    started = time.perf_counter()
    settings = spec.teacher_signal
    sharded = signal_pass(stage_dir, signal_settings(spec, teacher, engine))
    # The pass's own positions: rows in example_id order, so the same rows always make the same shards.
    rows = unique_rows(training_text(rows))
    rows = rows.append_column("input_position", pa.array(np.arange(rows.num_rows), pa.int64()))
    shards = split_into_shards(rows, settings.shard_rows)
    todo = sharded.pending(shards)
    temperatures = tail_temperatures(spec.distill.stages)
    log.info(
        "teacher_signal: %d rows in %d shards, %d already done; top-%s from %s with %s",
        rows.num_rows, len(shards), len(shards) - len(todo), describe_k(settings), teacher.path, engine,
    )  # fmt: skip
    if engine == "vllm" and temperatures:
        log.warning(
            "teacher_signal: vLLM returns only the top %d, so the tail's tempered mass at T %s is extrapolated, "
            "not exact (teacher_signal.engine: transformers stores it exactly)",
            settings.k, ", ".join(f"{t:g}" for t in temperatures),
        )  # fmt: skip
    columns = pa.schema(signal_fields(settings.logprob_dtype, adaptive=settings.k == "adaptive"))
    writer = ShardWriter(sharded, lambda rows: rows, lambda _: columns, "num_tokens")
    engine_kwargs = {"spec": spec, "teacher": teacher, "engine": engine}
    progress = sharded.score(todo, SignalEngine, engine_kwargs, settings, writer, "response tokens")
    done = sharded.read(columns=["example_id", "num_tokens"])
    sharded.check_complete(rows["example_id"], done)
    tokens = pc.sum(done["num_tokens"]).as_py() or 0
    adaptive = settings.k == "adaptive"
    mass_columns = ["num_tokens", "topk_logprobs", "tail_logprob", "tempered_tail_logprobs"]
    mass, ids_per_token = tail_mass(sharded.tables(mass_columns + [ADAPTIVE_COLUMN] * adaptive), temperatures)
    warn_about_tail_mass(mass, describe_k(settings))
    stored = sum(info.size for info in sharded.shards_dir.files())
    wall = time.perf_counter() - started
    return {
        "rows": rows.num_rows,
        "response_tokens": tokens,
        "shards": len(shards),
        "shards_reused": len(shards) - len(todo),
        "tokens_per_s": round(progress["tokens"] / wall, 1),
        "actor_busy_s": round(progress["busy_s"], 2),
        "stored_bytes": stored,
        "stored_bytes_per_token": round(stored / max(tokens, 1), 1),
        "raw_bytes_per_token": round(
            bytes_per_token(ids_per_token, settings.logprob_dtype, len(temperatures), adaptive), 1
        ),
        "ids_per_token": round(ids_per_token, 2),
        "tail_mass": mass,
        **sharded.settings,
        "engine_version": engine_version(engine),
    }


TAIL_MASS_BATCH_ROWS = 256


def tail_mass(shards: Iterable[pa.Table], temperatures: tuple[float, ...]) -> tuple[dict[str, float], float]:
    """Per temperature (1 and ``temperatures``), the teacher's mean mass outside its stored ids over all
    response tokens of ``shards``, of its tempered distribution p^(1/T) / Σ p^(1/T): what the sparse losses
    see as one outcome. It grows with T, as tempering flattens the many small probabilities of the tail.
    Also the mean number of ids stored per token. Shards are summed one at a time, so the whole signal is
    never in memory at once."""
    all_temperatures = np.array((1.0, *temperatures))
    totals, tokens, ids = np.zeros(len(all_temperatures)), 0, 0
    # A few hundred rows at a time: a whole shard's ids at float64 were about 50 MB at k 64.
    for batch in (batch for shard in shards for batch in shard.to_batches(max_chunksize=TAIL_MASS_BATCH_ROWS)):
        count = int(pc.sum(batch.column("num_tokens")).as_py() or 0)
        if count == 0:
            continue
        top = batch.column("topk_logprobs").flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        per_token = (batch.column(ADAPTIVE_COLUMN).flatten().to_numpy().astype(np.int64)
                     if ADAPTIVE_COLUMN in batch.schema.names else np.full(count, len(top) // count))  # fmt: skip
        starts = np.concatenate([[0], np.cumsum(per_token)[:-1]])
        tails = np.exp(np.column_stack([  # [tokens, temperatures]: the tail's tempered mass
            batch.column("tail_logprob").flatten().to_numpy(),
            batch.column("tempered_tail_logprobs").flatten().to_numpy().reshape(count, len(temperatures)),
        ]).astype(np.float64))  # fmt: skip
        for column, temperature in enumerate(all_temperatures):
            top_mass = np.add.reduceat(np.exp(top / temperature, dtype=np.float64), starts)
            totals[column] += (tails[:, column] / (top_mass + tails[:, column])).sum()
        tokens, ids = tokens + count, ids + len(top)
    shares = totals / max(tokens, 1)
    mass = {f"{t:g}": round(float(share), 4) for t, share in zip(all_temperatures, shares, strict=True)}
    return mass, ids / max(tokens, 1)


def describe_k(settings: TeacherSignalSpec) -> str:
    """k as logs say it: 64, or adaptive (99% of the mass, at most 1024)."""
    if settings.k == "adaptive":
        return f"adaptive ({100 * settings.coverage:g}% of the mass, at most {settings.max_k})"
    return str(settings.k)


def warn_about_tail_mass(mass: dict[str, float], k: str) -> None:
    """Say where a stage's temperature leaves much of the teacher outside the top k."""
    for temperature, share in mass.items():
        if share > TAIL_MASS_WARNING:
            log.warning(
                "teacher_signal: at T %s the teacher keeps %.0f%% of its tempered mass outside the stored top %s, "
                "which the sparse loss treats as one outcome; for stages at this temperature raise "
                "teacher_signal.k (or its coverage) or use distill.teacher_signal: online",
                temperature, 100 * share, k,
            )  # fmt: skip


def unique_rows(rows: pa.Table) -> pa.Table:
    """One row per example_id (a training row can also be a held-out row), in example_id order: ``rows``
    itself if it is already so, else one copy (taken in that order, not sorted and then filtered)."""
    if rows.num_rows < 2:
        return rows
    order = pc.sort_indices(rows["example_id"])
    ids = rows["example_id"].take(order)
    repeated = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).combine_chunks()  # does row i + 1 repeat row i?
    in_place = bool(np.all(order.to_numpy() == np.arange(len(order))))
    if in_place and not pc.any(repeated).as_py():
        return rows
    return rows.take(order.filter(pa.concat_arrays([pa.array([True]), pc.invert(repeated)])))


def read_signal(stage_dir: Place, columns: list[str] | None = None) -> pa.Table:
    """The signal columns training needs (or ``columns``), for every row the pass scored."""
    return signal_pass(stage_dir, {}).read(columns=columns or SIGNAL_COLUMNS)


def check_signal(rows: pa.Table, signal: pa.Table, tokenizer: Any, data: DataSpec) -> None:
    """Before training: every row has a signal, and it covers exactly the row's response tokens as
    training tokenizes them (a shard made from other text or token limits would silently misalign)."""
    counts = dict(zip(signal["example_id"].to_pylist(), signal["num_tokens"].to_pylist(), strict=True))
    missing = [example_id for example_id in rows["example_id"].to_pylist() if example_id not in counts]
    if missing:
        raise DataError(
            f"teacher_signal has no signal for {len(missing)} of {rows.num_rows} rows distillation needs "
            f"(first: {missing[0]}); rerun with --redo teacher_signal"
        )
    encode = RowFormat(tokenizer, data).example
    for example_id, prompt, response in zip(rows["example_id"].to_pylist(), prompts_of(rows),
                                            rows["response"].to_pylist(), strict=True):  # fmt: skip
        example = encode(prompt, response)
        expected = example.scored_tokens
        if counts[example_id] != expected:
            raise DataError(
                f"teacher_signal for row {example_id} covers {counts[example_id]} response tokens, but the row "
                f"tokenizes to {expected}; rerun with --redo teacher_signal"
            )
