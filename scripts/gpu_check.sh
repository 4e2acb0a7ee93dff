#!/usr/bin/env bash
# The GPU check of docs/performance.md: the CUDA tests, then the benchmark matrix (rmt_t/s/b and
# swin_t/s/b, bf16, batch 64 and 256, eager and compiled, the plain reference path, the resolution
# curve, CUDA graphs at batch 1 and 8, FlexAttention), inside about 8 minutes on an H100/H200.
# Everything lands under $OUT:
# log.txt, pytest.txt, one JSON per benchmark job, summary.json.
#
#   OUT=runs/gpu bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

{
  echo "== environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'gpu', torch.cuda.get_device_name())"
  echo "== CUDA tests"
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt" | tail -25
  echo "== benchmark matrix"
  timeout 480 $PY scripts/gpu_check.py --budget "${BUDGET:-330}"
} 2>&1 | tee "$OUT/log.txt"
