#!/usr/bin/env bash
# The default test run (what CI runs): every test that needs no GPU.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python -m pytest -q -rs "$@"
