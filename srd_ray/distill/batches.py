"""Which rows each optimizer step trains on, on which worker, in which micro-batch.

Every worker holds the whole pool of a stage (rows sorted by ``example_id``, so the pool is the same
everywhere) and computes the same plan from (seed, stage, epoch): a step's rows do not depend on how many
workers share them. The loss of a step is normalised by the step's response-token count, so the same rows
give the same gradient on 1 worker or 8; only the summation order differs.

With ``group_by_length`` each epoch's shuffled order is cut into mega-batches of 16 steps, sorted by length
inside each, cut into steps and the steps shuffled again: the set of rows trained per epoch and their
randomness stay, while a micro-batch holds rows of similar length (less padding). Within a step, rows are
dealt so that micro-batch *j* holds a band of similar lengths on every worker (no worker waits for another's
long rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from srd_ray.distill.losses import ScoredPositions, SparseTeacher
from srd_ray.errors import DataError
from srd_ray.models import TrainingExample, collate
from srd_ray.signals import TopK
from srd_ray.spec import StageSpec

MEGABATCH_STEPS = 16


@dataclass(frozen=True)
class BatchLayout:
    batch_size: int  # rows per micro-batch per worker (at most)
    accumulation: int  # micro-batches per optimizer step
    world: int  # workers
    group_by_length: bool = True

    @classmethod
    def of(cls, training: Any, world: int) -> BatchLayout:
        """From a job's training settings (``spec.TrainingSpec``), over ``world`` workers."""
        return cls(training.batch_size, training.gradient_accumulation_steps, world, training.group_by_length)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.accumulation * self.world

    def steps_per_epoch(self, rows: int) -> int:
        """Whole steps, plus a last partial one when its rows can give every worker a row in every
        micro-batch (else those few rows wait for the next epoch's reshuffle)."""
        full, remainder = divmod(rows, self.rows_per_step)
        return full + (remainder > 0 and self._fits(remainder))

    def _micro_batches(self, rows: int) -> int:
        return math.ceil(rows / (self.batch_size * self.world))

    def _fits(self, rows: int) -> bool:
        return rows >= self._micro_batches(rows) * self.world


def stage_steps(rows: int, settings: StageSpec, layout: BatchLayout) -> int:
    """Optimizer steps of one curriculum stage: its ``steps``, or ``epochs`` passes over its rows (0 when
    the rows cannot give every worker a row)."""
    per_epoch = layout.steps_per_epoch(rows)
    return (settings.steps or per_epoch * settings.epochs) if per_epoch else 0


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: ``groups[j][r]`` are the row indices of micro-batch j on worker r."""

    groups: tuple[tuple[tuple[int, ...], ...], ...]
    num_items: int  # response tokens over the whole step: the loss's normaliser
    positions: int  # token positions in all padded micro-batches of the step
    padding: int  # of which padding

    def micro_batches(self, rank: int) -> list[tuple[int, ...]]:
        return [micro[rank] for micro in self.groups]


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return ((seed * 1009 + stage) * 1009 + epoch) * 1009


def plan_epoch(
    lengths: Sequence[int], response_tokens: Sequence[int], layout: BatchLayout, seed: int
) -> list[StepPlan]:
    """The steps of one epoch over rows with these token lengths (same result on every worker)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    per_step = layout.rows_per_step
    full = len(order) // per_step * per_step
    steps = [order[i : i + per_step] for i in range(0, full, per_step)]
    if layout.group_by_length:
        steps = []
        for start in range(0, full, per_step * MEGABATCH_STEPS):
            mega = sorted(order[start : min(start + per_step * MEGABATCH_STEPS, full)], key=lambda i: -lengths[i])
            steps += [mega[i : i + per_step] for i in range(0, len(mega), per_step)]
        steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    remainder = order[full:]
    if remainder and layout.steps_per_epoch(len(order)) > len(steps):
        steps.append(remainder)
    return [deal_step(rows, lengths, response_tokens, layout) for rows in steps]


def _split(items: list[int], parts: int) -> list[list[int]]:
    """Contiguous parts whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


def deal_step(rows: list[int], lengths: Sequence[int], response_tokens: Sequence[int], layout: BatchLayout) -> StepPlan:
    """One step over ``rows``: micro-batches of similar lengths, each split over the workers."""
    if layout.group_by_length:
        rows = sorted(rows, key=lambda i: -lengths[i])
    bands = _split(rows, layout._micro_batches(len(rows)))
    groups = tuple(tuple(tuple(part) for part in _split(band, layout.world)) for band in bands)
    positions = sum(len(part) * max(lengths[i] for i in part) for micro in groups for part in micro)
    real = sum(lengths[i] for i in rows)
    return StepPlan(groups, int(sum(response_tokens[i] for i in rows)), int(positions), int(positions - real))


@dataclass
class TeacherView:
    """A micro-batch as the teacher's own chat template renders it, for a teacher model that runs in the
    step and renders chat rows differently from the student (another system prompt or header): its scored
    tokens are the student's, in the same order, at other positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored_index: torch.Tensor  # the teacher's hidden-state positions of the student's scored tokens

    @classmethod
    def of(cls, examples: Sequence[TrainingExample], pad_token_id: int, student: ScoredPositions) -> TeacherView:
        batch = collate(list(examples), pad_token_id)
        scored = ScoredPositions.of(batch["labels"])
        if not torch.equal(scored.targets, student.targets):  # the data check before any stage makes this so
            raise DataError("a row's scored tokens differ between the teacher's and the student's chat templates")
        return cls(batch["input_ids"], batch["attention_mask"], scored.index)

    def to(self, device: torch.device) -> TeacherView:
        return TeacherView(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask,
                                                                       self.scored_index)))  # fmt: skip


@dataclass
class MicroBatch:
    """Right-padded token ids, attention mask, the positions the loss scores and, with a stored teacher
    signal, the teacher's top-k at those positions; with a teacher that renders rows its own way, the
    teacher's view of the rows."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored: ScoredPositions
    teacher_topk: SparseTeacher | None = None
    teacher_view: TeacherView | None = None

    @classmethod
    def of(
        cls,
        examples: Sequence[TrainingExample],
        pad_token_id: int,
        signals: Sequence[TopK] | None = None,
        tail_temperatures: tuple[float, ...] = (),
        teacher_examples: Sequence[TrainingExample] | None = None,
    ) -> MicroBatch:
        """``tail_temperatures``: the temperatures of the signals' tempered-tail columns, in order.
        ``teacher_examples``: the same rows as the teacher renders them, where that differs."""
        batch = collate(list(examples), pad_token_id)
        scored = ScoredPositions.of(batch["labels"])
        view = None if teacher_examples is None else TeacherView.of(teacher_examples, pad_token_id, scored)
        topk = None
        if signals is not None:  # rows in batch order, tokens in order: aligned with the scored positions
            width = max(s.ids.shape[1] for s in signals)  # adaptive k: rows differ; padding fills the rest
            ids, logprobs = zip(*(s.padded_to(width) for s in signals), strict=True)
            topk = SparseTeacher(
                torch.from_numpy(np.concatenate(ids)).long(),
                torch.from_numpy(np.concatenate(logprobs)).float(),
                torch.from_numpy(np.concatenate([s.tail for s in signals])).float(),
                torch.from_numpy(np.concatenate([s.tempered_tails for s in signals])).float(),
                tail_temperatures,
            )
        return cls(batch["input_ids"], batch["attention_mask"], scored, topk, view)

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.scored.to(device),
            None if self.teacher_topk is None else self.teacher_topk.to(device),
            None if self.teacher_view is None else self.teacher_view.to(device),
        )
