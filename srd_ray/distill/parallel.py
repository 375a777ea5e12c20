"""How the student (and teacher) are spread over Ray Train workers: DDP or FSDP.

- ``ddp``: every worker holds a full student and teacher; gradients are averaged (gloo on CPU, NCCL on GPU).
- ``fsdp``: PyTorch FSDP2 (``fully_shard``) shards each decoder layer of the student *and* of the frozen
  teacher across workers, so a pair that does not fit one GPU still trains; the teacher is gathered
  layer by layer in its forward pass and never holds gradients.

Both keep the training loop's gradient convention (each worker's loss is scaled so the averaged gradient
is the global token mean). Saving and loading go through full (unsharded) state dicts, so a checkpoint
is a plain ``save_pretrained`` folder whichever strategy wrote it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def shard_model(model: torch.nn.Module, strategy: str, world: int) -> torch.nn.Module:
    """Wrap ``model`` for data-parallel training (DDP) or shard it (FSDP); unchanged on one worker."""
    if world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Transformers lists each architecture's decoder-layer class in _no_split_modules.
        layer_classes = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module)
        fully_shard(model)
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a gradient-accumulation step."""
    if enabled:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def unwrap(model: torch.nn.Module) -> Any:
    return model.module if hasattr(model, "module") else model


def full_model_state(model: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor] | None:
    """The unsharded weights (collective under FSDP: every worker must call it); None = use the model's."""
    if strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> dict:
    if strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, strategy: str) -> None:
    if strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
