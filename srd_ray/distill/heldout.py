"""The held-out KD metric of a training job: did distillation work?

The same held-out rows are scored against the teacher before training and after every stage. The value
is labelled with what it was measured against: the teacher model (exact) or the stored top-k signal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from srd_ray.distill.batches import MicroBatch
from srd_ray.distill.losses import LossSettings
from srd_ray.distill.parallel import Precision
from srd_ray.distill.step import heldout_kd


@dataclass(frozen=True)
class HeldoutProbe:
    """Scores ``batches`` on demand; without held-out rows (or a teacher) there is nothing to measure."""

    batches: list[MicroBatch]
    loss: LossSettings
    chunk_tokens: int
    precision: Precision
    device: torch.device
    teacher_signal: str  # "online": the teacher model; "topk": the stored signal

    def measure(self, model: nn.Module, strategy: Any, after_stage: int) -> dict[str, Any] | None:
        """The metrics event for ``after_stage`` (-1: before training), or None without held-out rows.
        ``strategy`` (a ``strategy.Strategy``) puts the model in its evaluation form: every worker scores
        the same rows, since FSDP forwards are collective."""
        if not self.batches:
            return None
        with strategy.evaluation(model):
            value = heldout_kd(model, self.batches, loss=self.loss, chunk_tokens=self.chunk_tokens,
                               precision=self.precision, device=self.device)  # fmt: skip
        return {"event": "heldout", "after_stage": after_stage, "heldout_kd": value,
                "teacher_signal": self.teacher_signal}  # fmt: skip
