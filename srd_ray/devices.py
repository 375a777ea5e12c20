"""Where a stage computes: the one place that turns "Ray lent this process N GPUs" into a torch device.

Engine actors (reflect, the teacher pass, evaluate, generation actors) and training workers ask here. A
process Ray lent a GPU computes on CUDA. One that was lent a GPU but sees no CUDA (a CPU build of torch on
a GPU node, a driver mismatch) is a broken node: it stops with an error that says so, instead of
training for hours on the CPU.

The seam: with ``SRD_GPU_PATH_ON_CPU=1`` such a process computes on the CPU instead, and training uses
gloo. The tests run the whole GPU path that way, on a local Ray told it has GPUs (``ray.num_gpus``), so
every actor pool, placement group and Train worker that asks for GPUs is scheduled as on a cluster.
"""

from __future__ import annotations

import os

import torch

from srd_ray.failures import InfrastructureError

CPU_FOR_GPUS = "SRD_GPU_PATH_ON_CPU"


def gpu_path_on_cpu() -> bool:
    """The test seam is on: processes lent a GPU compute on the CPU when CUDA is absent."""
    return os.environ.get(CPU_FOR_GPUS, "") not in ("", "0")


def uses_cuda(num_gpus: float) -> bool:
    """Whether a process lent ``num_gpus`` GPUs computes on CUDA (the seam aside, it must)."""
    if num_gpus <= 0:
        return False
    if torch.cuda.is_available():
        return True
    if gpu_path_on_cpu():
        check_lent(num_gpus)
        return False
    raise InfrastructureError(
        f"this process was lent {num_gpus:g} GPU(s) by Ray, but torch {torch.__version__} sees no CUDA device "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): install a CUDA build of torch "
        "on the GPU nodes, or set the stage's num_gpus_per_actor / use_gpu to 0 / false"
    )


def device_for(num_gpus: float) -> torch.device:
    """The device of an engine actor lent ``num_gpus`` GPUs (Ray sets CUDA_VISIBLE_DEVICES: its first)."""
    return torch.device("cuda") if uses_cuda(num_gpus) else torch.device("cpu")


def process_group_backend(use_gpu: bool) -> str:
    """The collective backend of training workers: NCCL on GPUs, gloo on CPUs (and under the seam)."""
    return "gloo" if not use_gpu or gpu_path_on_cpu() else "nccl"


def check_lent(num_gpus: float) -> None:
    """Under the seam, the GPUs a process computes as if it had must be ones Ray lent it: a stage whose
    actors or workers were scheduled without their GPUs fails here, in the tests, instead of on a cluster."""
    import ray

    if ray.is_initialized() and len(ray.get_gpu_ids()) < max(1, int(num_gpus)):
        raise RuntimeError(f"asked for {num_gpus:g} GPU(s), but Ray lent this process {ray.get_gpu_ids()}")
