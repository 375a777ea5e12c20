"""Curriculum planning: which datasets each training stage trains on, and for how many steps. SRD: stage s
trains on the rank stage's buckets 0..s; the matched baseline (``curriculum: none``): every stage on all
rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from srd_ray.distill.batches import BatchLayout, stage_steps
from srd_ray.errors import DataError
from srd_ray.spec import DistillSpec, StageSpec


@dataclass(frozen=True)
class StagePlan:
    """What one curriculum stage trains on, and how."""

    index: int
    datasets: tuple[str, ...]
    settings: StageSpec


def bucket_name(bucket: int) -> str:
    return f"bucket_{bucket}"


def plan_curriculum(spec: DistillSpec) -> tuple[StagePlan, ...]:
    """SRD: stage s trains on buckets 0..s. none: every stage trains on all rows (the matched baseline)."""
    if spec.curriculum == "none":
        return tuple(StagePlan(i, ("all",), stage) for i, stage in enumerate(spec.stages))
    return tuple(
        StagePlan(i, tuple(bucket_name(b) for b in range(i + 1)), stage) for i, stage in enumerate(spec.stages)
    )


def steps_of_stage(stage: StagePlan, rows: int, layout: BatchLayout) -> int:
    """A stage's optimizer steps over ``rows`` rows; a stage too small for its workers is an error."""
    steps = stage_steps(rows, stage.settings, layout)
    if steps == 0:
        raise DataError(f"stage {stage.index} has {rows} training rows: too few for {layout.world} workers")
    return steps


def planned_steps(
    plan: Sequence[StagePlan], planned_rows: dict[str, int], layout: BatchLayout, rows_of: Callable[[StagePlan], int]
) -> int:
    """Every stage's optimizer steps (what a schedule spanning stages decays over). A stage whose datasets
    do not exist yet (``rank.refresh`` makes them later) counts their planned rows; ``rows_of`` counts the
    rows of one that exists."""
    total = 0
    for stage in plan:
        if all(name in planned_rows for name in stage.datasets):
            total += stage_steps(sum(planned_rows[name] for name in stage.datasets), stage.settings, layout)
        else:
            total += steps_of_stage(stage, rows_of(stage), layout)
    return total
