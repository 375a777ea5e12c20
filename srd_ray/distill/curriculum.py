"""Curriculum planning: which datasets each training stage trains on. SRD: stage s trains on the rank
stage's buckets 0..s; the matched baseline (``curriculum: none``): every stage on all rows."""

from __future__ import annotations

from srd_ray.distill.worker import StagePlan
from srd_ray.spec import DistillSpec


def bucket_name(bucket: int) -> str:
    return f"bucket_{bucket}"


def plan_curriculum(spec: DistillSpec) -> tuple[StagePlan, ...]:
    """SRD: stage s trains on buckets 0..s. none: every stage trains on all rows (the matched baseline)."""
    if spec.curriculum == "none":
        return tuple(StagePlan(i, ("all",), stage) for i, stage in enumerate(spec.stages))
    return tuple(
        StagePlan(i, tuple(bucket_name(b) for b in range(i + 1)), stage) for i, stage in enumerate(spec.stages)
    )
