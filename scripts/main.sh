#!/usr/bin/env bash
# The main job: a real generation on the default model (SmolLM2-135M-Instruct).
# Extra arguments go to `pagedllm generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
if [ $# -eq 0 ]; then
    set -- --prompt "The capital of France is" --max-tokens 32
fi
exec .venv/bin/pagedllm generate "$@"
