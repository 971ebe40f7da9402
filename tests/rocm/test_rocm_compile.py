"""The Triton kernels compile for AMD MI300X (gfx942) and MI250 (gfx90a) without one.

Compiling runs in a subprocess because the interpreter (TRITON_INTERPRET=1,
set for the other tests here) replaces @triton.jit functions with Python
ones. Each binary must be an AMDGPU ELF for the asked processor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from platforms.rocm.compile_check import kernel_builds

ELF_MAGIC = b"\x7fELF"
EM_AMDGPU = 224
#: EF_AMDGPU_MACH values (low byte of the ELF e_flags)
AMDGPU_MACH = {"gfx90a": 0x3F, "gfx942": 0x4C}
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", sorted(AMDGPU_MACH))
def test_every_kernel_compiles_to_an_amdgpu_binary(target, tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "platforms.rocm.compile_check", "--target", target,
         "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel in kernel_builds():
        binary = (tmp_path / f"{target}-{kernel}.hsaco").read_bytes()
        assert binary[:4] == ELF_MAGIC, kernel
        assert int.from_bytes(binary[18:20], "little") == EM_AMDGPU, kernel
        assert int.from_bytes(binary[48:52], "little") & 0xFF == AMDGPU_MACH[target], kernel
