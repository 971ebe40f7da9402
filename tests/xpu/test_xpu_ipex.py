"""The xpu/ipex conformance rows, on CPU tensors, in their torch 2.8 + IPEX venv.

IPEX 2.8 imports only beside torch 2.8, so `python -m ci.xpu_venv` runs the
rows in a second venv: the first run builds it (about 2 minutes and a 4 GB
download, 6.8 GB on disk, under $PAGEDLLM_CACHE or ~/.cache/pagedllm), later
runs reuse it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_ipex_backend_passes_every_quick_row_in_its_venv():
    run = subprocess.run([sys.executable, "-m", "ci.xpu_venv"], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    report = run.stdout + run.stderr[-4000:]
    assert run.returncode == 0, report
    summary = re.search(r"^xpu/ipex\s+(\d+) passed, (\d+) failed, (\d+) skipped$",
                        run.stdout, re.MULTILINE)
    assert summary, report
    passed, failed, skipped = map(int, summary.groups())
    assert (failed, skipped) == (0, 0) and passed > 0, report
