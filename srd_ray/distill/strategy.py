"""How the student and teacher are spread over workers: one object per ``distill.strategy`` owns every act
that differs between them, so the trainer, the step and student generation never branch on it.

- ``ddp`` (:class:`DataParallel`): every worker holds a full student and teacher; gradients are averaged
  (gloo on CPU, NCCL on GPU). One worker: the plain model.
- ``fsdp`` (:class:`FullySharded`): PyTorch FSDP2 shards each decoder layer of the student and of the
  frozen teacher across workers, so a pair that does not fit one GPU still trains. Allowed at one worker,
  so one GPU exercises the same code.

What the FSDP object owns, and why:

- **Two roots.** The student's root is the :class:`~srd_ray.distill.step.DistillationModel` (its
  embeddings, final norm and head); the teacher is its own root, held outside the pair's module tree, as
  torchtune's KD recipe does. The teacher's bf16 weights never share an FSDP group with the trainable
  student, FSDP's backward prefetch never targets teacher layers (which have no backward), and the
  teacher's root is released right after each micro-batch's loss instead of being held until backward.
- **Built on the meta device, then loaded into shards:** each worker reads the weights on the CPU and
  copies in only its own slice of each tensor (:func:`load_into_shards`).
- **Forward through the root.** ``generate`` is registered as an FSDP forward method of the student root,
  so in-worker sampling gathers the root like a training forward does, even as the first forward after a
  resume (review F2). A forward without backward (generation, the held-out metric) leaves the root
  gathered; the object reshards it after, so checkpoints see the sharded parameters the optimizer holds.
- **Gradient clipping** is the same call for both (``step.clip_grad_norm``): under FSDP the norm is a
  DTensor, reduced to the global norm for the log.
- **State on rank 0 only:** full state dicts are gathered to rank 0's CPU (other ranks hold nothing);
  a LoRA student gathers its adapters only.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from srd_ray.distill.parallel import Precision
from srd_ray.distill.step import DistillationModel, FrozenTeacher
from srd_ray.errors import ModelError


class ModelSource(Protocol):
    """What a strategy builds from: the student and teacher, loaded or as meta-device skeletons."""

    def student(self, device: torch.device | str) -> nn.Module:
        """The student with its weights (the spec's, or the checkpoint's), on ``device``."""

    def student_skeleton(self) -> nn.Module:
        """The student's structure on the meta device (LoRA adapters added), no weights."""

    def teacher(self, device: torch.device | str) -> nn.Module | None:
        """The frozen teacher with its weights on ``device``; None when training needs no teacher model."""

    def teacher_skeleton(self) -> nn.Module | None: ...

    def pair(self, student: nn.Module, teacher: FrozenTeacher | None) -> DistillationModel:
        """The pair trained (checks the heads against the tokenizer)."""


class DataParallel:
    """``ddp``: a full copy per worker."""

    name = "ddp"
    sharded = False

    def __init__(self, device: torch.device, rank: int, world: int, precision: Precision) -> None:
        self.device, self.rank, self.world, self.precision = device, rank, world, precision

    def build(self, source: ModelSource) -> nn.Module:
        teacher = source.teacher(self.device)
        pair = source.pair(source.student(self.device), FrozenTeacher(teacher) if teacher is not None else None)
        if self.world == 1:
            return pair
        from torch.nn.parallel import DistributedDataParallel

        # The teacher is outside the pair's module tree: DDP neither broadcasts nor reduces it.
        return DistributedDataParallel(pair, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def pair(self, model: nn.Module) -> DistillationModel:
        """The pair inside the wrapper."""
        return unwrap(model)

    @property
    def synced_gpus(self) -> bool:
        """Whether generating needs every worker to step together (sharded forwards are collective)."""
        return False

    @contextlib.contextmanager
    def generation(self, model: nn.Module) -> Iterator[nn.Module]:
        """The module to call ``generate`` on, in eval mode for the block."""
        student = self.pair(model).student
        was_training = student.training
        student.eval()
        try:
            yield student
        finally:
            student.train(was_training)

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        """A no-grad forward of the pair (the held-out metric), in eval mode for the block."""
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)

    def student_state_dict(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """The student's full weights on rank 0's CPU (``trainable_only``: the LoRA adapters); None elsewhere.
        Collective: every worker calls it."""
        if self.rank != 0:
            return None
        pair = self.pair(model)
        return {name: tensor.detach().cpu() for name, tensor in pair.student.state_dict().items()
                if not trainable_only or name in trainable(pair)}  # fmt: skip

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The full optimizer state on rank 0; None elsewhere (collective)."""
        return optimizer.state_dict() if self.rank == 0 else None

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class FullySharded(DataParallel):
    """``fsdp``: FSDP2, the student and the teacher each their own root (see the module docstring)."""

    name = "fsdp"
    sharded = True

    def build(self, source: ModelSource) -> nn.Module:
        skeleton = source.teacher_skeleton()
        teacher = FrozenTeacher(skeleton) if skeleton is not None else None
        pair = source.pair(source.student_skeleton(), teacher)
        if teacher is not None:
            self._shard(teacher.lm, root=teacher)
        self._shard(pair.student, root=pair)
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(pair, "generate")
        for module in (pair, teacher):
            if module is not None:
                module.to_empty(device=self.device)
        load_into_shards(pair.student, source.student("cpu"))
        if teacher is not None:
            load_into_shards(teacher.lm, source.teacher("cpu"))
        return pair

    def _shard(self, model: nn.Module, root: nn.Module) -> None:
        """Each decoder layer its own unit, the rest (embeddings, final norm, head) in ``root``'s."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if self.precision.dtype is not None:
            policy = MixedPrecisionPolicy(param_dtype=self.precision.dtype, reduce_dtype=torch.float32)
        layers = decoder_layers(model)
        if not layers:  # one unit, gathered whole: no memory saved, and nothing says so (review F15)
            raise ModelError(
                f"distill.strategy fsdp: no decoder layer found in {type(causal_lm_of(model)).__name__} (its "
                "_no_split_modules name none of its modules), so nothing would be sharded; use strategy ddp"
            )
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(root, mp_policy=policy)

    @property
    def synced_gpus(self) -> bool:
        return self.world > 1

    @contextlib.contextmanager
    def generation(self, model: nn.Module) -> Iterator[nn.Module]:
        """The pair itself: its ``generate`` is a registered FSDP forward method of the student root."""
        pair = self.pair(model)
        was_training = pair.student.training
        pair.student.eval()
        try:
            yield pair
        finally:
            pair.student.train(was_training)
            pair.reshard()

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        with super().evaluation(model):
            try:
                yield
            finally:
                self.pair(model).reshard()

    def student_state_dict(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        pair = self.pair(model)
        pair.reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(pair.student, options=options)  # gathered to rank 0's CPU only
        if self.rank != 0:
            return None
        # A head tied to frozen embeddings passes ignore_frozen_params under its own name: drop it too.
        return {name: tensor for name, tensor in state.items() if not trainable_only or name in trainable(pair)}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.pair(model).reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        return state if self.rank == 0 else None

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


STRATEGIES = {"ddp": DataParallel, "fsdp": FullySharded}


def strategy_for(name: str, device: torch.device, rank: int, world: int, precision: Precision) -> DataParallel:
    return STRATEGIES[name](device, rank, world, precision)


# --------------------------------------------------------------------------------------------------------
# Helpers


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own)."""
    return model.module if hasattr(model, "module") else model


def trainable(pair: DistillationModel) -> set[str]:
    """The names of the student's trainable parameters (a LoRA student's adapters)."""
    return {name for name, parameter in pair.student.named_parameters() if parameter.requires_grad}


def causal_lm_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Each architecture's decoder-layer modules (transformers lists their classes in _no_split_modules)."""
    lm = causal_lm_of(model)
    layer_classes = set(getattr(lm, "_no_split_modules", None) or [])
    return [module for module in lm.modules() if type(module).__name__ in layer_classes]


def local_piece(full: torch.Tensor, sharded: Any) -> torch.Tensor:
    """This worker's slice of ``full`` (a CPU tensor) for the DTensor ``sharded``, cut on the CPU: FSDP2's
    Shard(dim) placement is ``torch.chunk`` along ``dim`` over a 1-D mesh (review F10: never the whole tensor
    on the GPU first). Other layouts go through ``distribute_tensor``."""
    from torch.distributed.tensor import Shard, distribute_tensor

    placements, mesh = sharded.placements, sharded.device_mesh
    if len(placements) == 1 and isinstance(placements[0], Shard):
        dim = placements[0].dim
        pieces = torch.chunk(full, mesh.size(), dim=dim)
        rank = mesh.get_local_rank()
        piece = pieces[rank] if rank < len(pieces) else full.narrow(dim, 0, 0)
        if piece.shape == sharded.to_local().shape:
            return piece
    placed = distribute_tensor(full.to(sharded.device), mesh, placements, src_data_rank=None)
    return placed.to_local()


@torch.no_grad()
def load_into_shards(target: nn.Module, reference: nn.Module) -> None:
    """Copy ``reference``'s weights and buffers (a CPU model of the same structure) into ``target``, a
    sharded model on its device: each worker keeps only its shard of each tensor."""
    from torch.distributed.tensor import DTensor

    source = dict(itertools.chain(reference.named_parameters(), reference.named_buffers()))
    for name, tensor in itertools.chain(target.named_parameters(), target.named_buffers()):
        full = source[name].detach().to(dtype=tensor.dtype)
        if isinstance(tensor, DTensor):
            tensor.to_local().copy_(local_piece(full, tensor))
        else:
            tensor.copy_(full)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on every worker's CPU, gathered one tensor at a time (collective). For tests and
    benchmarks; training saves through the strategy (rank 0 only)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, tensor in module.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().cpu()
    return state
