#!/usr/bin/env bash
# The engine on a GPU, in one device call: environment, GPU tests, throughput
# benchmark (with HF baselines and the decode-step profile). Logs under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_engine.sh
#
# TESTS_TIMEOUT / BENCH_TIMEOUT (seconds) bound each stage so that a hang in
# one still leaves the other's log; RUN_TESTS=0 skips the tests; BENCH_ARGS is
# appended to the benchmark's command line (e.g. "--hf-max-batches 2").
set -u
OUT=${OUT:-/tmp/gpu_engine}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TESTS_TIMEOUT=${TESTS_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|tokenizers|safetensors|numpy|pytest|hypothesis|accelerate) "
  nproc
} 2>&1 | tee "$OUT/env.log"

if [ "${RUN_TESTS:-1}" != 0 ]; then
  timeout "$TESTS_TIMEOUT" python3 -m pytest -q -rs -p no:cacheprovider --durations=15 \
    tests/test_engine_gpu.py tests/test_fast_path.py tests/rocm/test_rocm_engine.py -s \
    2>&1 | tee "$OUT/tests.log"
  echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
fi

# shellcheck disable=SC2086
timeout "$BENCH_TIMEOUT" python3 benchmarks/throughput.py --device cuda \
  --trace "$OUT/decode_trace.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
gzip -f "$OUT/decode_trace.json" 2>/dev/null
