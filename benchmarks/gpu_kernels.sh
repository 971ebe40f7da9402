#!/usr/bin/env bash
# The CUDA platform on a GPU machine, in one go: build the extension, run the
# full conformance matrix, the GPU tests and the kernel benchmark. Every step
# is logged under $OUT (default ./gpu-logs); summary.log has each step's exit
# status and time. Exit status 1 if any step failed.
#
#   OUT=/tmp/logs BACKENDS=cuda,triton benchmarks/gpu_kernels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-logs}
PY=${PYTHON:-python3}
BACKENDS=${BACKENDS:-cuda,triton}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repo itself, installed or not
mkdir -p "$OUT"
: > "$OUT/summary.log"
status=0

step() {  # step NAME COMMAND...: run, tee to $OUT/NAME.log, record rc and seconds
  local name=$1 started rc
  shift
  echo "== $name: $*"
  started=$(date +%s)
  "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $(( $(date +%s) - started )) s" | tee -a "$OUT/summary.log"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  nvidia-smi
  nvcc --version
  $PY -c "import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.log" 2>&1
step build $PY -c "
import time
started = time.perf_counter()
from platforms.cuda.build import load_extension
load_extension()
print(f'extension ready in {time.perf_counter() - started:.1f} s')"
step conformance $PY -m ci.conformance --platform cuda
step gpu-tests $PY -m pytest -q -rs tests/test_cuda_gpu.py
step benchmark $PY benchmarks/attention_kernels.py --backends "$BACKENDS"
cat "$OUT/summary.log"
exit $status
