"""A training job's optimizer (AdamW), its cosine learning-rate schedule and fp16's gradient scaler.

The release starts a new optimizer at every curriculum stage (``reset_optimizer_each_stage``); otherwise one
optimizer and one schedule span every stage. A resumed job takes the checkpoint's states, except an
optimizer saved at the end of a stage that the next stage would have replaced anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from srd_ray.distill.state import TrainState


class Optimization:
    def __init__(self, training: Any, precision: Any, device: torch.device, reset_each_stage: bool) -> None:
        self.training, self.reset_each_stage = training, reset_each_stage
        self.scaler = precision.grad_scaler(device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def start(self, model: nn.Module, lr: float, total_steps: int) -> None:
        """A new optimizer over the trainable weights, its schedule decaying over ``total_steps``."""
        parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=self.training.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=total_steps, eta_min=self.training.min_lr
        )

    def restore(self, model: nn.Module, state: TrainState, strategy: Any) -> None:
        """After a resume: the checkpoint's scaler, optimizer and schedule, unless the optimizer was saved at
        the end of a stage and every stage starts a fresh one. The states are handed over once."""
        optimizer, scheduler, scaler = state.release_optimizer()
        if scaler:
            self.scaler.load_state_dict(scaler)
        if optimizer is not None and (state.stage_step > 0 or not self.reset_each_stage):
            strategy.load_optimizer_state(model, self.optimizer, optimizer)
            self.scheduler.load_state_dict(scheduler)

    def state(self, model: nn.Module, strategy: Any) -> dict[str, Any]:
        """What a checkpoint keeps of it (collective under FSDP: the optimizer state is gathered)."""
        return {
            "optimizer": strategy.optimizer_state(model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]
