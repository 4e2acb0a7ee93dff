#!/usr/bin/env bash
# The GPU check of docs/performance.md: the CUDA tests, the attention kernels alone, then the
# benchmark matrix (rmt_t/s/b and swin_t/s/b, bf16, batch 64 and 256, eager and compiled, the
# plain reference path, the reparameterized models, RMT without its weight cache, SDPA, a
# profile, CUDA graphs, the resolution curve), inside 7.5 minutes on an H100/H200 (each step has
# a hard limit); the matrix skips the jobs its budget cannot start.
# Everything lands under $OUT: log.txt, pytest.txt, attention.json and gpu_check.json.
#
#   OUT=runs/gpu bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

{
  echo "== environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c "import torch, timm, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  echo "== CUDA tests"
  # in this order: the Triton kernel tests, last, compile a kernel for each configuration they
  # try, so a run that reaches the time limit loses those first (the depthwise conv's, off by
  # default, before the attention's)
  timeout 150 $PY -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda.py tests/test_reparameterize.py::test_reparameterize_removes_the_float32_norm_copies_on_cuda "tests/test_reparameterize.py::test_compiled_reparameterized_model_has_no_graph_break_under_autocast[cuda]" tests/test_autocast_weight_cache.py::test_cuda_cached_pass_is_bitwise_the_same_with_one_cast tests/test_fused_attention.py tests/test_depthwise_conv.py 2>&1 | tee "$OUT/pytest.txt" | tail -25
  echo "== attention kernels alone"
  timeout 60 $PY scripts/gpu_attention_variants.py --budget "${ATTENTION_BUDGET:-30}"
  echo "== benchmark matrix"
  timeout "${MATRIX_TIMEOUT:-240}" $PY scripts/gpu_check.py --budget "${BUDGET:-180}"
} 2>&1 | tee "$OUT/log.txt"
