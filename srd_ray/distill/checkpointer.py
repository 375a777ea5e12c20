"""Checkpoints: what a worker reports so a job resumes exactly where it stopped.

A checkpoint folder holds the student (``save_pretrained``: LoRA adapters only for a LoRA student), the
tokenizer, and ``TrainState`` (position, optimizer, schedule, grad scaler, every rank's RNG, the replay
buffer); the last one of a job also holds the LoRA student merged into its base (``MERGED_DIR``), the
plain folder users load. Saving is collective (under FSDP, full weights and optimizer state are gathered
from every worker); rank 0 alone writes, and every rank reports to the host.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srd_ray.distill.parallel import gather_objects
from srd_ray.distill.state import MERGED_DIR, MODEL_DIR, TrainState, capture_rng
from srd_ray.models import load_adapter, load_model


class Checkpointer:
    def __init__(self, job: Any, host: Any, strategy: Any, tokenizer: Any, device: torch.device) -> None:
        self.job, self.host, self.strategy, self.tokenizer, self.device = job, host, strategy, tokenizer, device

    @property
    def lora(self) -> bool:
        return getattr(self.job.student, "lora", None) is not None

    def save(self, model: nn.Module, position: TrainState, optimization: Any, replay: dict[str, Any] | None,
             metrics: dict[str, Any], final: bool = False) -> None:  # fmt: skip
        """Report a checkpoint that resumes at ``position``, with ``optimization``'s states (an
        ``optimization.Optimization``) and (student generation) the replay buffer's; ``metrics`` ride along
        with the report."""
        weights = self.strategy.student_state_dict(model, trainable_only=self.lora)
        state = TrainState(
            stage=position.stage, stage_step=position.stage_step, global_step=position.global_step,
            tokens_seen=position.tokens_seen, **optimization.state(model, self.strategy),
            rng=gather_objects(capture_rng(self.device)), replay=replay,
        )  # fmt: skip
        report = {"stage": state.stage, "stage_step": state.stage_step, "global_step": state.global_step,
                  "tokens_seen": state.tokens_seen, **metrics, "checkpoint": True}  # fmt: skip
        if self.host.rank != 0:
            self.host.report(report, None)
            return
        with tempfile.TemporaryDirectory(prefix="srd-checkpoint-") as scratch:
            folder = Path(scratch)
            student = self.strategy.pair(model).student
            student.save_pretrained(folder / MODEL_DIR, state_dict=weights, safe_serialization=True)
            self.tokenizer.save_pretrained(folder / MODEL_DIR)
            state.save(folder)
            if final and self.lora:
                self._save_merged(folder)
            self.host.report(report, folder)

    def _save_merged(self, folder: Path) -> None:
        """The LoRA student users get: adapters merged into the base, a plain save_pretrained folder."""
        merged = load_adapter(load_model(self.job.student, "cpu"), str(folder / MODEL_DIR)).merge_and_unload()
        merged.save_pretrained(folder / MERGED_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(folder / MERGED_DIR)
