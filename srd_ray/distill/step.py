"""One optimizer step, and the held-out KD metric, under plain ``torch.distributed``: no Ray here, so the
same code runs in a Ray Train worker, a test, or a GPU check with NCCL.

``DistillationModel`` puts the trained student and the frozen teacher behind one ``forward`` that returns
the loss. DDP and FSDP2 wrap this module (see ``strategy``), so every student weight the loss reads (its
head included) is gathered and reduced by them, and the models' own output heads never run: the loss reads
the final hidden states at response positions and applies the heads chunk by chunk. The teacher
(``FrozenTeacher``) is held outside the pair's module tree: no wrapper reduces it, and under FSDP it is a
root of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from srd_ray.distill.batches import MicroBatch, TeacherView
from srd_ray.distill.losses import (
    DenseTeacher,
    Head,
    LossSettings,
    LossSums,
    ScoredPositions,
    SparseTeacher,
    StageWeights,
    Teacher,
    distillation_loss,
    gather_scored,
)
from srd_ray.distill.parallel import Precision, gradient_sync
from srd_ray.models import final_hidden_states, output_head


class FrozenTeacher(nn.Module):
    """The frozen teacher behind one forward: its final hidden states (the loss applies its head, chunk by
    chunk, from ``head``). Under FSDP this module is the teacher's root unit."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return final_hidden_states(self.lm, input_ids, attention_mask)

    def head(self, vocab_size: int) -> Head:
        return output_head(self.lm, vocab_size)

    def release(self) -> None:
        """Free the gathered root (embeddings, norm, head) once a micro-batch's loss is computed; a no-op
        unless sharded. (An FSDP root is not resharded after its forward on its own.)"""
        if hasattr(self, "reshard"):
            self.reshard()


class DistillationModel(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module | None, vocab_size: int) -> None:
        super().__init__()
        self.student = student
        if teacher is not None and not isinstance(teacher, FrozenTeacher):
            teacher = FrozenTeacher(teacher)
        # Not a submodule: DDP must not reduce it, and FSDP shards it as a root of its own.
        object.__setattr__(self, "teacher", teacher)
        self.vocab_size = vocab_size

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """The student's ``generate`` (under FSDP a registered forward method of this, the student's root)."""
        return self.student.generate(**kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        scored_index: torch.Tensor,
        targets: torch.Tensor,
        *,
        stage: StageWeights,
        settings: LossSettings,
        num_items_in_batch: float,
        gradient_scale: float,
        chunk_tokens: int,
        teacher_topk: SparseTeacher | None = None,
        teacher_view: TeacherView | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised loss, CE sum, KD sum) of one micro-batch; a tuple, which DDP passes through. The KD
        teacher is the stored top-k signal when given, else the teacher model (on ``teacher_view`` when the
        teacher renders the rows its own way)."""
        positions = ScoredPositions(scored_index, targets)
        teacher = None
        if stage.kd_weight > 0 and settings.name != "sft":
            view = teacher_view or TeacherView(input_ids, attention_mask, scored_index)
            teacher = self._teacher(view.input_ids, view.attention_mask, ScoredPositions(view.scored_index, targets),
                                    teacher_topk)  # fmt: skip
        hidden = gather_scored(final_hidden_states(self.student, input_ids, attention_mask), positions)
        sums = distillation_loss(
            hidden, output_head(self.student, self.vocab_size), teacher, targets,
            stage=stage, settings=settings, num_items_in_batch=num_items_in_batch,
            gradient_scale=gradient_scale, chunk_tokens=chunk_tokens,
        )  # fmt: skip
        if isinstance(teacher, DenseTeacher):  # the fused loss is done with the teacher's logits
            self.teacher.release()
        return sums.loss, sums.ce_sum, sums.kd_sum

    def _teacher(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: ScoredPositions,
        teacher_topk: SparseTeacher | None,
    ) -> Teacher | None:
        """The stored top-k signal when the batch carries one, else the teacher model's logits."""
        if teacher_topk is not None:
            return teacher_topk
        if self.teacher is None:
            return None
        with torch.no_grad():
            hidden = self.teacher(input_ids, attention_mask)
            return DenseTeacher(self.teacher.head(self.vocab_size), gather_scored(hidden, positions))


@dataclass(frozen=True)
class StepSettings:
    stage: StageWeights
    loss: LossSettings
    chunk_tokens: int
    max_grad_norm: float
    world: int  # data-parallel wrappers average gradients over workers: the loss is scaled back by this

    @classmethod
    def of_stage(cls, stage: Any, loss: LossSettings, training: Any, world: int) -> StepSettings:
        """A curriculum stage's step (``stage``: its ``spec.StageSpec``) under the job's training settings."""
        weights = StageWeights(stage.kd_weight, stage.temperature)
        return cls(weights, loss, training.loss_chunk_tokens, training.max_grad_norm, world)


def forward_micro_batch(
    model: nn.Module,
    batch: MicroBatch,
    settings: StepSettings,
    num_items: int,
    precision: Precision,
    device: torch.device,
) -> LossSums:
    batch = batch.to(device)
    with precision.autocast(device):
        loss, ce_sum, kd_sum = model(
            batch.input_ids, batch.attention_mask, batch.scored.index, batch.scored.targets,
            stage=settings.stage, settings=settings.loss, num_items_in_batch=num_items,
            gradient_scale=settings.world, chunk_tokens=settings.chunk_tokens, teacher_topk=batch.teacher_topk,
            teacher_view=batch.teacher_view,
        )  # fmt: skip
    return LossSums(loss, ce_sum, kd_sum)


@dataclass
class StepResult:
    """This worker's loss sums over the step's micro-batches: device tensors, read only at log steps."""

    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    grad_norm: torch.Tensor


def train_step(
    model: nn.Module,
    micro_batches: list[MicroBatch],
    num_items: int,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    settings: StepSettings,
    precision: Precision,
    device: torch.device,
) -> StepResult:
    """Forward and backward every micro-batch (gradients reduced on the last), clip, step. ``num_items``
    is the step's response-token count over all workers. No host sync: nothing here reads a value back."""
    model.train()
    ce_sum = torch.zeros((), device=device)
    kd_sum = torch.zeros((), device=device)
    for position, batch in enumerate(micro_batches):
        with gradient_sync(model, enabled=position == len(micro_batches) - 1):
            sums = forward_micro_batch(model, batch, settings, num_items, precision, device)
            scaler.scale(sums.loss).backward()
        ce_sum += sums.ce_sum
        kd_sum += sums.kd_sum
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(model, settings.max_grad_norm)
    if optimizer_stepped(scaler, optimizer):
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(ce_sum, kd_sum, grad_norm)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the trainable gradients; returns their global norm as a device tensor. Under FSDP the norm is a
    Partial DTensor whose local value is one worker's share: ``full_tensor`` reduces it (review F16)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def optimizer_stepped(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Step the optimizer through the scaler; False when fp16's scaler skipped the step (inf/NaN gradients),
    so the LR schedule does not advance on it either (review C7). Reads the scale back in fp16 only."""
    if not scaler.is_enabled():
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before  # the scale shrinks exactly when the step was skipped


@torch.no_grad()
def heldout_kd(
    model: nn.Module,
    batches: list[MicroBatch],
    *,
    loss: LossSettings,
    chunk_tokens: int,
    precision: Precision,
    device: torch.device,
) -> float:
    """Token-mean KD loss (T = 1, no T² factor) of the student on held-out rows: did distillation work?
    Every worker scores the same rows (FSDP forwards are collective), so no reduction is needed."""
    settings = StepSettings(StageWeights(kd_weight=1.0, temperature=1.0), loss.for_heldout(), chunk_tokens, 0.0, 1)
    was_training = model.training
    model.eval()
    kd = torch.zeros((), device=device)
    tokens = 0
    for batch in batches:
        kd += forward_micro_batch(model, batch, settings, 1, precision, device).kd_sum
        tokens += batch.scored.targets.numel()
    model.train(was_training)
    return kd.item() / max(tokens, 1)
