"""In which precision training computes, and the collectives workers share (the strategies that spread the
models over workers, DDP and FSDP2, are in ``strategy``).

Mixed precision keeps fp32 master weights and optimizer state and computes under autocast; FSDP2 also gets
a ``MixedPrecisionPolicy`` (parameters gathered in bf16/fp16, gradients reduced in fp32). fp16 adds a
gradient scaler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from srd_ray import auto
from srd_ray.errors import SpecError

PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Precision:
    name: str  # bf16-mixed | fp16-mixed | fp32

    @property
    def dtype(self) -> torch.dtype | None:
        """The compute dtype of mixed precision; None for plain fp32."""
        return PRECISION_DTYPES[self.name]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not."""
        return torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """The precision ``choice`` names, ``auto`` resolved for ``device`` (``srd_ray.auto``)."""
    return Precision(auto.precision(choice, *auto.device_facts(device.type)))


def precision_problem(choice: str, device_name: str, bf16_supported: bool) -> str | None:
    """Why a GPU cannot run ``choice`` (None if it can). ``auto`` falls back instead of failing."""
    if choice == "bf16-mixed" and not bf16_supported:
        return (
            f"bf16-mixed needs a GPU with bfloat16 (compute capability 8.0+, e.g. A100, H100); the workers have "
            f"{device_name}: use fp16-mixed or fp32"
        )
    return None


def check_gpu_precision(section: str, choice: str) -> None:
    """Ask one GPU of the cluster (as a training worker would get it) whether it runs ``choice``; fail
    before the job starts instead of in every worker."""
    import ray

    problem = precision_problem(choice, *ray.get(ray.remote(num_gpus=1, num_cpus=0)(gpu_facts).remote()))
    if problem:
        raise SpecError(f"{section}.precision: {problem}")


def gpu_facts() -> tuple[str, bool]:
    """This GPU's name and whether it computes bf16 natively. Emulated bf16 (V100, T4) does not count: it
    runs, slowly, and ``auto`` would not pick it either (review F13)."""
    return torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(including_emulation=False)


def setup_device_math(device: torch.device) -> None:
    """TF32 tensor-core matmuls on GPUs for whatever stays in fp32 (10-bit mantissa; standard for training)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------------------------------------
# Gradient sync and collectives


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over workers, in place, on the tensor's own device (NCCL takes GPU tensors only)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_objects(value: Any) -> list[Any]:
    """Every worker's ``value``, in rank order (each worker gets the list)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: Any) -> Any:
    """Worker 0's ``value`` on every worker (a barrier for the others)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
