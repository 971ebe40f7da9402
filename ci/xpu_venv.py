"""Run the xpu/ipex conformance rows in their own torch 2.8 + IPEX venv.

intel-extension-for-pytorch 2.8.0 refuses to import beside any torch but
2.8, while the main venv keeps torch 2.13, so the ipex rows run in a second
venv: built once under `$PAGEDLLM_CACHE/xpu-venv` (default
`~/.cache/pagedllm/xpu-venv`) and reused. torch 2.8.0 from the package index
is a CUDA build (about 4 GB to download, 6.8 GB installed) that runs on the
CPU, which is where the rows run when no Intel GPU is present.

    python -m ci.xpu_venv            # build if absent, run the quick rows
    python -m ci.xpu_venv --full     # every row of the matrix
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: what the venv holds; the conformance runner itself needs only torch + numpy
REQUIREMENTS = ("torch==2.8.0", "intel-extension-for-pytorch==2.8.0", "numpy")
# Written last, after every install succeeded: a venv without it (an
# interrupted build) or with other requirements is rebuilt from scratch.
_MARKER = "pagedllm-requirements.txt"


def venv_dir() -> Path:
    cache = os.environ.get("PAGEDLLM_CACHE") or Path.home() / ".cache" / "pagedllm"
    return Path(cache) / "xpu-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _is_ready(venv: Path) -> bool:
    marker = venv / _MARKER
    return marker.is_file() and marker.read_text() == "\n".join(REQUIREMENTS)


def ensure_venv(venv: Path | None = None) -> Path:
    """Create (or reuse) the venv; returns its python. Logs the build time."""
    venv = venv or venv_dir()
    if _is_ready(venv):
        return venv_python(venv)
    if venv.exists():
        shutil.rmtree(venv)
    started = time.monotonic()
    print(f"[xpu_venv] building {venv} ({' '.join(REQUIREMENTS)}); "
          "first time only, several GB", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *REQUIREMENTS], check=True)
    (venv / _MARKER).write_text("\n".join(REQUIREMENTS))
    print(f"[xpu_venv] built in {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)
    return venv_python(venv)


def run_conformance(quick: bool = True, venv: Path | None = None) -> int:
    """Run `ci.conformance` for xpu/ipex on CPU tensors inside the venv."""
    python = ensure_venv(venv)
    command = [str(python), "-m", "ci.conformance", "--platform", "xpu",
               "--backend", "ipex", "--device", "cpu"]
    if quick:
        command.append("--quick")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run(command, cwd=REPO_ROOT, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="run every row instead of the quick subset")
    args = parser.parse_args(argv)
    return run_conformance(quick=not args.full)


if __name__ == "__main__":
    sys.exit(main())
