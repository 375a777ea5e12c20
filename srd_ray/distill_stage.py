"""The pipeline's training stages (teacher_sft, distill): their inputs turned into a ``TrainingJob`` and the
tables it trains on. Orchestration, above the stages it reads (rank buckets, the teacher signal) and the
training package it runs (``srd_ray.distill``).

SRD feeds the rank stage's buckets (one Ray dataset each; stage s trains on buckets 0..s), the matched
baseline (``curriculum: none``) and teacher SFT feed all training rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from srd_ray import auto
from srd_ray.data import row_positions
from srd_ray.distill.curriculum import bucket_name, plan_curriculum
from srd_ray.distill.driver import run_training
from srd_ray.distill.losses import LossSettings
from srd_ray.distill.worker import StagePlan, TrainingJob
from srd_ray.encoding import prompts_of, text_columns, training_text
from srd_ray.errors import DataError, SpecError
from srd_ray.models import load_tokenizer
from srd_ray.rank import bucket_dir, read_manifest
from srd_ray.spec import JobSpec, ModelSpec, StageSpec
from srd_ray.storage import Location, Place
from srd_ray.teacher_signal import check_signal, read_signal

if TYPE_CHECKING:
    from srd_ray.refresh import Reflector


def training_job(spec: JobSpec, stage_dir: Place, **settings: Any) -> TrainingJob:
    """A job with the run's data settings and seed, logging to ``stage_dir/metrics.jsonl``."""
    metrics_path = str(Location.of(stage_dir) / "metrics.jsonl")
    return TrainingJob(
        data=spec.data, seed=spec.run.seed, metrics_path=metrics_path, run_name=spec.run.name, **settings
    )


def run_teacher_sft(spec: JobSpec, train_rows: pa.Table, stage_dir: Place) -> dict[str, Any]:
    """Fine-tune the teacher on the training references (cross-entropy only), as the SRD paper does."""
    sft = spec.teacher_sft
    plan = (StagePlan(0, ("all",), StageSpec(epochs=sft.epochs, kd_weight=0.0, lr=sft.lr)),)
    # The teacher's weights are trained here: an ``auto`` dtype keeps float32 master weights.
    teacher = spec.models.teacher.model_copy(update={"dtype": auto.trained_weights_dtype(spec.models.teacher.dtype)})
    job = training_job(
        spec, stage_dir, name="teacher_sft", training=sft, student=teacher, teacher=None, plan=plan,
        loss=LossSettings("sft"),
    )  # fmt: skip
    return run_training(job, {"all": training_text(train_rows)}, stage_dir)


def check_buckets(rank_dir: Location, used: range) -> None:
    """Every bucket a stage needs must exist and hold rows: fail before the first step, not in a worker."""
    manifest = read_manifest(rank_dir)
    rows = {bucket["bucket"]: bucket["rows"] for bucket in manifest["buckets"]}
    for bucket in used:
        if rows.get(bucket, 0) == 0:
            raise DataError(
                f"rank bucket {bucket} is {'empty' if bucket in rows else 'missing'} ({rank_dir}); distill stage "
                f"{bucket} trains on buckets 0..{bucket}: use fewer rank.num_buckets or more data"
            )


def bucket_tables(rank_dir: Location, buckets: range, train_rows: pa.Table) -> dict[int, pa.Table]:
    """The training columns of each rank bucket's rows, in the bucket's (curriculum) order. Only the ids are
    read from the buckets; the text is taken from ``train_rows``, which the driver holds anyway: one
    exact-size copy, where reading a bucket's text from Parquet cost the driver twice its size."""
    check_buckets(rank_dir, buckets)
    text = training_text(train_rows)
    return {b: text.take(row_positions(text, bucket_ids(rank_dir, b), f"rank bucket {b}", "rank")) for b in buckets}


def bucket_ids(rank_dir: Location, bucket: int) -> pa.ChunkedArray:
    return bucket_dir(rank_dir, bucket).read_parquet(columns=["example_id"])["example_id"]


def read_training_text(folder: Location) -> pa.Table:
    names = pq.ParquetDataset(folder.path, filesystem=folder.filesystem).schema.names
    return folder.read_parquet(columns=text_columns(names))


def training_rows(spec: JobSpec, rank_dir: Place | None, train_rows: pa.Table) -> pa.Table:
    """Every row distillation may train on, in input order: the kept buckets' rows (SRD), or all rows
    (``curriculum: none``, and ``rank.refresh: every_stage``, whose later buckets are chosen during
    training)."""
    text = training_text(train_rows)
    if rank_dir is None or spec.rank.refresh == "every_stage":
        return text
    rank_dir = Location.of(rank_dir)
    check_buckets(rank_dir, range(spec.rank.keep_buckets))
    kept = pa.chunked_array([chunk for b in range(spec.rank.keep_buckets) for chunk in bucket_ids(rank_dir, b).chunks])
    kept_rows = np.zeros(text.num_rows, bool)
    kept_rows[row_positions(text, kept, "the kept rank buckets", "rank").to_numpy()] = True
    return text.filter(kept_rows)


def generation_engine(spec: JobSpec) -> str:
    """The engine of ``distill.student_generation``. Generation actors load plain weights, so a LoRA
    student samples in the training workers (transformers)."""
    settings = spec.distill.student_generation
    if settings.mode == "off":
        return "transformers"
    lora = spec.models.student.lora is not None
    if settings.engine == "vllm" and lora:
        raise SpecError(
            "distill.student_generation.engine is vllm, but a LoRA student (models.student.lora) samples in the "
            "training workers: use engine transformers or auto"
        )
    return "transformers" if lora else auto.engine(settings.engine, "distill.student_generation.engine")


def run_distill(
    spec: JobSpec,
    teacher: ModelSpec,
    stage_dir: Place,
    *,
    rank_dir: Place | None,
    train_rows: pa.Table,
    heldout_rows: pa.Table,
    signal_dir: Place | None = None,
    reflector: Reflector | None = None,
) -> dict[str, Any]:
    """Curriculum KD from the rank stage's buckets (SRD) or from all rows (``curriculum: none``); with a
    ``signal_dir`` the teacher's stored top-k signal replaces the teacher model. With ``rank.refresh:
    every_stage`` the ``reflector`` scores the rows left between stages (see ``srd_ray.refresh``)."""
    distill = spec.distill
    plan = plan_curriculum(distill)
    refreshing = rank_dir is not None and spec.rank.refresh == "every_stage"
    if rank_dir is None:
        tables = {"all": training_text(train_rows)}
    elif refreshing:
        tables = {}  # the buckets come one stage at a time
    else:
        buckets = bucket_tables(Location.of(rank_dir), range(len(distill.stages)), train_rows)
        tables = {bucket_name(b): table for b, table in buckets.items()}
    heldout = heldout_rows  # already the first distill.heldout_rows (pipeline.heldout_rows)
    if signal_dir is not None:
        counts = read_signal(signal_dir, ["example_id", "num_tokens"])
        used = pa.concat_tables([*(tables.values() or [training_rows(spec, rank_dir, train_rows)]), heldout])
        check_signal(used, counts, load_tokenizer(spec.models.student), spec.data)
    job = training_job(
        spec, stage_dir, name="distill", training=distill, student=spec.models.student, teacher=teacher,
        plan=plan, loss=distill.loss_settings, reset_optimizer_each_stage=distill.reset_optimizer_each_stage,
        teacher_signal=distill.teacher_signal,
        heldout=tuple(zip(heldout["example_id"].to_pylist(), prompts_of(heldout), heldout["response"].to_pylist(),
                          strict=True)),
        generation_engine=generation_engine(spec), vllm=spec.engine.vllm,
        signal_files=str(Location.of(signal_dir) / "shards") if signal_dir is not None else None,
    )  # fmt: skip
    if refreshing:
        from srd_ray.refresh import train_with_refresh

        if reflector is None:
            raise ValueError("rank.refresh every_stage needs a reflector")
        summary = train_with_refresh(job, reflector, Location.of(rank_dir), train_rows, Location.of(stage_dir))
    else:
        summary = run_training(job, tables, stage_dir)
    summary["curriculum"] = distill.curriculum
    summary["loss"] = distill.loss
    summary["teacher_signal"] = distill.teacher_signal
    return summary
