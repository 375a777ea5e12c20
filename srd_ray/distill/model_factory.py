"""The student and teacher a training job trains with, as a strategy asks for them (see ``strategy``):
loaded on a device, or as meta-device skeletons to shard first.

- The student comes from the spec, or from the checkpoint a run resumes from. A resumed student's weights
  already hold what the spec's ``adapter`` added (a teacher SFT of an adapted teacher): it is not merged a
  second time (review C1). A LoRA student is its base plus adapters: new ones (seeded, so every worker
  starts equal) or the checkpoint's.
- The teacher is loaded frozen, in ``models.teacher.dtype`` (``auto``: bfloat16 on GPUs, float32 on CPUs;
  see ``srd_ray.auto``), unless training reads the stored top-k signal instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srd_ray.distill.state import MODEL_DIR
from srd_ray.distill.step import DistillationModel, FrozenTeacher
from srd_ray.errors import ModelError
from srd_ray.models import (
    add_lora,
    build_on_meta,
    causal_lm,
    check_same_tokenizer,
    load_adapter,
    load_model,
    load_tokenizer,
    weights_dtype,
)
from srd_ray.spec import ModelSpec

log = logging.getLogger(__name__)


class ModelFactory:
    def __init__(self, job: Any, tokenizer: Any, device: torch.device, checkpoint: Path | None, rank: int) -> None:
        self.job, self.tokenizer, self.device = job, tokenizer, device
        self.checkpoint, self.rank = checkpoint, rank
        self.teacher_spec = self._teacher_spec()
        if self.teacher_spec is not None:
            check_same_tokenizer(load_tokenizer(self.teacher_spec), tokenizer)

    @property
    def lora(self) -> Any:
        return getattr(self.job.student, "lora", None)

    def student(self, device: torch.device | str) -> nn.Module:
        spec = self.job.student
        if self.lora is None:
            return load_model(self.resumed_spec(spec) if self.checkpoint else spec, device)
        base = load_model(spec, device)
        if self.checkpoint:
            return load_adapter(base, str(self.checkpoint / MODEL_DIR))
        torch.manual_seed(self.job.seed)  # new adapters start equal on every worker, with any world size
        return add_lora(base, self.lora)

    def resumed_spec(self, spec: ModelSpec) -> ModelSpec:
        """The student as the checkpoint holds it: its weights, with nothing to merge into them (C1)."""
        update: dict[str, Any] = {"path": str(self.checkpoint / MODEL_DIR)}
        if getattr(spec, "adapter", None) is not None:
            update["adapter"] = None
        return spec.model_copy(update=update)

    def student_skeleton(self) -> nn.Module:
        student = build_on_meta(self.job.student)
        return add_lora(student, self.lora) if self.lora else student

    def teacher(self, device: torch.device | str) -> nn.Module | None:
        return load_model(self.teacher_spec, device) if self.teacher_spec is not None else None

    def teacher_skeleton(self) -> nn.Module | None:
        return build_on_meta(self.teacher_spec) if self.teacher_spec is not None else None

    def pair(self, student: nn.Module, teacher: FrozenTeacher | None) -> DistillationModel:
        vocab = len(self.tokenizer)
        heads = {"student": causal_lm(student).config.vocab_size}
        if teacher is not None:
            heads["teacher"] = causal_lm(teacher.lm).config.vocab_size
        if min(heads.values()) < vocab:
            raise ModelError(f"the tokenizer has {vocab} tokens but a model head has fewer: {heads}")
        if self.rank == 0 and max(heads.values()) > vocab:
            log.info("logits cut to the tokenizer's %d tokens (padded heads: %s)", vocab, heads)
        if self.job.training.activation_checkpointing:
            causal_lm(student).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return DistillationModel(student, teacher, vocab)

    def _teacher_spec(self) -> ModelSpec | None:
        teacher = self.job.teacher
        if not self.job.uses_teacher_model:
            return None
        return teacher.model_copy(update={"dtype": weights_dtype(teacher, self.device)})
