"""``TrainState``: exactly what a checkpoint holds besides the model weights.

A checkpoint folder is ``model/`` (the student as ``save_pretrained`` writes it: full weights, or the LoRA
adapters for a LoRA student), ``training_state.pt`` (this dataclass) and, in the checkpoint taken after the
last stage of a LoRA run, ``merged/`` (adapters merged into the base: the model users get). Everything in
``training_state.pt`` is tensors and plain Python values, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from srd_ray.errors import DataError

TRAINING_STATE = "training_state.pt"
MODEL_DIR = "model"
MERGED_DIR = "merged"


@dataclass
class TrainState:
    stage: int = 0  # the curriculum stage to run (or continue)
    stage_step: int = 0  # optimizer steps already done in that stage
    global_step: int = 0
    tokens_seen: int = 0  # response tokens trained on, all workers
    optimizer: dict[str, Any] | None = None  # full (unsharded) optimizer state
    scheduler: dict[str, Any] | None = None
    grad_scaler: dict[str, Any] | None = None  # fp16-mixed only
    rng: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per rank: CPU and (if any) CUDA state
    replay: dict[str, Any] | None = None  # student generation's replay buffer (ReplayBuffer.state())

    def save(self, folder: Path) -> None:
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, folder / TRAINING_STATE)

    @classmethod
    def load(cls, folder: Path) -> TrainState:
        return cls(**torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True))

    def release_optimizer(self) -> tuple[dict | None, dict | None, dict | None]:
        """Hand the optimizer, scheduler and scaler states over once (they are large; keep no second copy)."""
        states = self.optimizer, self.scheduler, self.grad_scaler
        self.optimizer = self.scheduler = self.grad_scaler = None
        return states


def seed_or_resume_rng(state: TrainState, seed: int, rank: int, world: int, device: torch.device, job: str) -> None:
    """A fresh job seeds each rank; a resumed one checks it has as many workers as wrote the checkpoint (the
    step plan and every rank's RNG stream depend on the count, review C8) and restores this rank's RNG."""
    if not state.rng:
        torch.manual_seed(seed + rank)
        return
    if len(state.rng) != world:
        raise DataError(
            f"{job}: the checkpoint was written by {len(state.rng)} worker(s), this run has {world} "
            f"({job}.num_workers): resume with the same number, or rerun with --redo {job}"
        )
    restore_rng(state.rng[rank], device)


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
