"""The training stages of the pipeline: their inputs turned into a ``TrainingJob`` and Ray datasets.

SRD feeds the rank stage's buckets (one Ray dataset each; stage s trains on buckets 0..s), the matched
baseline (``curriculum: none``) and teacher SFT feed all training rows.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from srd_ray.distill.driver import run_training
from srd_ray.distill.losses import LossSettings
from srd_ray.distill.worker import StagePlan, TrainingJob
from srd_ray.errors import DataError
from srd_ray.rank import bucket_dir
from srd_ray.spec import DistillSpec, JobSpec, ModelSpec, StageSpec
from srd_ray.storage import Location, Place

TRAINING_COLUMNS = ["example_id", "prompt", "response"]


def bucket_name(bucket: int) -> str:
    return f"bucket_{bucket}"


def plan_curriculum(spec: DistillSpec) -> tuple[StagePlan, ...]:
    """SRD: stage s trains on buckets 0..s. none: every stage trains on all rows (the matched baseline)."""
    if spec.curriculum == "none":
        return tuple(StagePlan(i, ("all",), stage) for i, stage in enumerate(spec.stages))
    return tuple(
        StagePlan(i, tuple(bucket_name(b) for b in range(i + 1)), stage) for i, stage in enumerate(spec.stages)
    )


def training_job(spec: JobSpec, stage_dir: Place, **settings: Any) -> TrainingJob:
    """A job with the run's data settings and seed, logging to ``stage_dir/metrics.jsonl``."""
    metrics_path = str(Location.of(stage_dir) / "metrics.jsonl")
    return TrainingJob(data=spec.data, seed=spec.run.seed, metrics_path=metrics_path, **settings)


def run_teacher_sft(spec: JobSpec, train_rows: pa.Table, stage_dir: Place) -> dict[str, Any]:
    """Fine-tune the teacher on the training references (cross-entropy only), as the SRD paper does."""
    import ray

    sft = spec.teacher_sft
    plan = (StagePlan(0, ("all",), StageSpec(epochs=sft.epochs, kd_weight=0.0, lr=sft.lr)),)
    job = training_job(
        spec, stage_dir, name="teacher_sft", training=sft, student=spec.models.teacher, teacher=None, plan=plan,
        loss=LossSettings("sft"),
    )  # fmt: skip
    return run_training(job, {"all": ray.data.from_arrow(train_rows.select(TRAINING_COLUMNS))}, stage_dir)


def check_buckets(rank_dir: Location, used: range) -> None:
    """Every bucket a stage needs must exist and hold rows: fail before the first step, not in a worker."""
    manifest = json.loads((rank_dir / "manifest.json").read_text())
    rows = {bucket["bucket"]: bucket["rows"] for bucket in manifest["buckets"]}
    for bucket in used:
        if rows.get(bucket, 0) == 0:
            raise DataError(
                f"rank bucket {bucket} is {'empty' if bucket in rows else 'missing'} ({rank_dir}); distill stage "
                f"{bucket} trains on buckets 0..{bucket}: use fewer rank.num_buckets or more data"
            )


def _pairs(rows: pa.Table | None, limit: int) -> tuple[tuple[str, str], ...]:
    if rows is None:
        return ()
    rows = rows.sort_by("input_position").slice(0, limit)
    return tuple(zip(rows["prompt"].to_pylist(), rows["response"].to_pylist(), strict=True))


def run_distill(
    spec: JobSpec,
    teacher: ModelSpec,
    stage_dir: Place,
    *,
    rank_dir: Place | None,
    train_rows: pa.Table | None,
    heldout_rows: pa.Table | None = None,
) -> dict[str, Any]:
    """Curriculum KD from the rank stage's buckets (SRD) or from all rows (``curriculum: none``)."""
    import ray

    distill = spec.distill
    plan = plan_curriculum(distill)
    if distill.curriculum == "none":
        assert train_rows is not None
        datasets = {"all": ray.data.from_arrow(train_rows.select(TRAINING_COLUMNS))}
    else:
        assert rank_dir is not None
        rank_dir = Location.of(rank_dir)
        used = range(len(distill.stages))
        check_buckets(rank_dir, used)
        # Materialised into the object store before training: the workers then pull blocks without
        # needing free CPUs for read tasks (on a small machine the workers hold them all).
        datasets = {}
        for b in used:
            folder = bucket_dir(rank_dir, b)
            datasets[bucket_name(b)] = ray.data.read_parquet(
                folder.path, filesystem=folder.filesystem, columns=TRAINING_COLUMNS
            ).materialize()
    job = training_job(
        spec, stage_dir, name="distill", training=distill, student=spec.models.student, teacher=teacher,
        plan=plan, loss=distill.loss_settings, reset_optimizer_each_stage=distill.reset_optimizer_each_stage,
        teacher_dtype=distill.teacher_dtype, heldout=_pairs(heldout_rows, distill.heldout_rows),
    )  # fmt: skip
    summary = run_training(job, datasets, stage_dir)
    summary["curriculum"] = distill.curriculum
    summary["loss"] = distill.loss
    return summary
