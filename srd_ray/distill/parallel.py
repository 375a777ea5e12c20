"""How the student and teacher are spread over workers, and in which precision they compute.

- ``ddp``: every worker holds a full student and teacher; gradients are averaged (gloo on CPU, NCCL on GPU).
- ``fsdp``: PyTorch FSDP2 (``fully_shard``) shards each decoder layer of the student *and* of the frozen
  teacher across workers, so a pair that does not fit one GPU still trains. Both models are built on the
  meta device, sharded, and only then given weights: each worker reads the weights on the CPU (safetensors,
  memory-mapped) and copies in its own shard, so no GPU ever holds a whole model.

Mixed precision keeps fp32 master weights and optimizer state and computes under autocast; FSDP2 also gets
a ``MixedPrecisionPolicy`` (parameters gathered in bf16/fp16, gradients reduced in fp32). fp16 adds a
gradient scaler. Saving goes through full (unsharded) state dicts, so a checkpoint is a plain
``save_pretrained`` folder whichever strategy wrote it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

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
    """``auto``: bf16-mixed on GPUs that have bf16 (fp16-mixed on older ones), fp32 on CPUs (CPU autocast
    is emulated and slower than fp32)."""
    if choice != "auto":
        return Precision(choice)
    if device.type != "cuda":
        return Precision("fp32")
    return Precision("bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16-mixed")


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

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> tuple[str, bool]:
        return torch.cuda.get_device_name(), torch.cuda.is_bf16_supported()

    problem = precision_problem(choice, *ray.get(probe.remote()))
    if problem:
        raise SpecError(f"{section}.precision: {problem}")


def setup_device_math(device: torch.device) -> None:
    """TF32 tensor-core matmuls on GPUs for whatever stays in fp32 (10-bit mantissa; standard for training)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------------------------------------
# Wrapping


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Each architecture's decoder-layer modules (transformers lists their classes in _no_split_modules)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(lm, "_no_split_modules", None) or [])
    return [module for module in lm.modules() if type(module).__name__ in layer_classes]


def shard(pair: nn.Module, models: list[nn.Module], precision: Precision) -> None:
    """FSDP2: each decoder layer of each model its own unit, the rest (embeddings, final norms, heads) in
    the root unit, which stays gathered from the forward through the backward of a step."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision.dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    for model in models:
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
    fully_shard(pair, mp_policy=policy)


def data_parallel(pair: nn.Module, frozen_prefix: str, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters; the frozen teacher under ``frozen_prefix`` is neither broadcast
    at start nor reduced."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, _ in itertools.chain(pair.named_parameters(), pair.named_buffers())
              if name.startswith(frozen_prefix)]  # fmt: skip
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pair, frozen)
    return DistributedDataParallel(pair, device_ids=[device.index] if device.type == "cuda" else None)


@torch.no_grad()
def load_into_shards(target: nn.Module, reference: nn.Module) -> None:
    """Copy ``reference``'s weights and buffers (a CPU model of the same structure) into ``target``, a
    sharded model on its device: each worker keeps only its shard of each tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    source = dict(itertools.chain(reference.named_parameters(), reference.named_buffers()))
    for name, tensor in itertools.chain(target.named_parameters(), target.named_buffers()):
        full = source[name].detach().to(tensor.device, tensor.dtype)
        if isinstance(tensor, DTensor):
            # src_data_rank=None: every worker has the full tensor already; slice locally, no traffic.
            local = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
            tensor.to_local().copy_(local.to_local())
        else:
            tensor.copy_(full)


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


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own)."""
    return model.module if hasattr(model, "module") else model


# --------------------------------------------------------------------------------------------------------
# Full (unsharded) state for checkpoints


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on the CPU, gathered one tensor at a time (collective: every worker calls it)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, tensor in module.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().cpu()
    return state


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


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
