"""Distill: curriculum knowledge distillation (and the optional teacher SFT) on Ray Train.

``losses`` holds the KD loss registry; ``train`` the training loop and its Ray Train driver. This module
wires stage outputs to the trainer: SRD feeds the rank stage's buckets (one Ray dataset each), the matched
baseline (``curriculum: none``) and teacher SFT feed all training rows.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from srd_ray.distill.train import LossSettings, StagePlan, bucket_name, plan_curriculum, run_training
from srd_ray.errors import DataError
from srd_ray.rank import bucket_dir
from srd_ray.spec import JobSpec, ModelSpec, StageSpec
from srd_ray.storage import Location, Place

TRAINING_COLUMNS = ["example_id", "prompt", "response"]


def run_teacher_sft(spec: JobSpec, train_rows: pa.Table, stage_dir: Place) -> dict[str, Any]:
    """Fine-tune the teacher on the training references (cross-entropy only), as the SRD paper does."""
    import ray

    sft = spec.teacher_sft
    plan = [StagePlan(0, ("all",), StageSpec(epochs=sft.epochs, kd_weight=0.0, lr=sft.lr))]
    return run_training(
        name="teacher_sft",
        training=sft,
        data=spec.data,
        student=spec.models.teacher,
        teacher=None,
        plan=plan,
        datasets={"all": ray.data.from_arrow(train_rows.select(TRAINING_COLUMNS))},
        loss=LossSettings("sft"),
        seed=spec.run.seed,
        stage_dir=stage_dir,
    )


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


def _pairs(rows: pa.Table | None, limit: int) -> list[tuple[str, str]]:
    if rows is None:
        return []
    rows = rows.sort_by("input_position").slice(0, limit)
    return list(zip(rows["prompt"].to_pylist(), rows["response"].to_pylist(), strict=True))


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

    plan = plan_curriculum(spec.distill)
    if spec.distill.curriculum == "none":
        assert train_rows is not None
        datasets = {"all": ray.data.from_arrow(train_rows.select(TRAINING_COLUMNS))}
    else:
        assert rank_dir is not None
        rank_dir = Location.of(rank_dir)
        used = range(len(spec.distill.stages))
        check_buckets(rank_dir, used)
        # Materialised into the object store before training: the workers then pull blocks without
        # needing free CPUs for read tasks (on a small machine the workers hold them all).
        datasets = {}
        for b in used:
            folder = bucket_dir(rank_dir, b)
            datasets[bucket_name(b)] = ray.data.read_parquet(
                folder.path, filesystem=folder.filesystem, columns=TRAINING_COLUMNS
            ).materialize()
    summary = run_training(
        name="distill",
        training=spec.distill,
        data=spec.data,
        student=spec.models.student,
        teacher=teacher,
        plan=plan,
        datasets=datasets,
        loss=LossSettings.from_spec(spec.distill),
        seed=spec.run.seed,
        stage_dir=stage_dir,
        reset_optimizer_each_stage=spec.distill.reset_optimizer_each_stage,
        teacher_dtype=spec.distill.teacher_dtype,
        heldout=_pairs(heldout_rows, spec.distill.heldout_rows),
    )
    summary["curriculum"] = spec.distill.curriculum
    summary["loss"] = spec.distill.loss
    return summary
