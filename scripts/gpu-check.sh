#!/usr/bin/env bash
# The GPU check: one prepared run on a machine with CUDA torch, transformers, peft and pyarrow but no Ray
# and no vLLM (the lent H200). Under 8 minutes. Small wheels the machine lacks (pydantic and its parts)
# travel in .gpu-wheels/, made here first with:   scripts/gpu-check.sh --fetch-wheels
# On the GPU machine:                              scripts/gpu-check.sh      (results in $OUT or a temp dir)
# (with the device tool: run "scripts/gpu-check.sh", carry [".gpu-wheels"], timeout 540; then copy
#  $OUT/gpu_check.{json,log} to bench/results/)
# Without a GPU it runs on the CPU with gloo: a dry run of the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
if [ "${1:-}" = "--fetch-wheels" ]; then
    # The GPU machine's Python is 3.12; pin to what the project resolves here.
    pins=$(.venv/bin/pip list --format=freeze 2>/dev/null | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|pyyaml)==' || true)
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS" $pins
    ls -la "$WHEELS"
    exit 0
fi
export OUT="${OUT:-$(mktemp -d)}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d "$WHEELS" ] && ! "$PY" -c "import pydantic" 2>/dev/null; then
    site=$(mktemp -d)  # not under $OUT: only results travel back
    "$PY" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 470 "$PY" scripts/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
