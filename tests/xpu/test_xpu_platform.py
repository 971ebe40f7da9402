"""The xpu platform: detection, its contract names, lazy vendor imports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import platforms
from platforms.xpu import XpuPlatform

HAS_INTEL_GPU = hasattr(torch, "xpu") and torch.xpu.is_available()


@pytest.mark.skipif(HAS_INTEL_GPU, reason="an Intel GPU is present here")
def test_xpu_is_unavailable_without_an_intel_gpu_and_says_so():
    platform = platforms.get("xpu")
    assert platform.is_available() is False
    assert "Intel GPU" in platform.unavailable_reason()
    with pytest.raises(RuntimeError, match="Intel GPU"):
        platform.memory_info()


@pytest.mark.skipif(HAS_INTEL_GPU, reason="an Intel GPU is present here")
def test_llm_on_xpu_without_an_intel_gpu_fails_naming_it():
    from engine import LLM
    with pytest.raises(ValueError, match=r"device='xpu': no Intel GPU"):
        LLM("no-model-needed-to-fail", device="xpu")


def test_reason_names_the_intel_gpu_when_torch_has_no_xpu_module(monkeypatch):
    monkeypatch.delattr(torch, "xpu")
    platform = XpuPlatform()
    assert platform.is_available() is False
    reason = platform.unavailable_reason()
    assert "Intel GPU" in reason and torch.__version__ in reason


def test_memory_info_reads_torch_xpu_when_a_device_is_present(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda: (3 << 30, 16 << 30))
    assert XpuPlatform().memory_info() == (16 << 30, 3 << 30)


def test_xpu_platform_uses_xpu_names_and_both_backends():
    platform = platforms.get("xpu")
    assert (platform.name, platform.device, platform.dist_backend) == ("xpu", "xpu", "xccl")
    assert platform.backend_names() == ["ipex", "openvino"]
    assert platform.attention_backend().name == "ipex"
    assert platform.attention_backend("openvino").name == "openvino"
    with pytest.raises(ValueError, match="'triton'"):
        platform.attention_backend("triton")


def test_getting_the_backends_imports_neither_vendor_stack():
    code = ("import sys, platforms\n"
            "p = platforms.get('xpu')\n"
            "print([p.attention_backend(n).name for n in p.backend_names()])\n"
            "print(sorted(m for m in ('intel_extension_for_pytorch', 'openvino')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["['ipex', 'openvino']", "[]"]


@pytest.mark.skipif(importlib.util.find_spec("intel_extension_for_pytorch") is not None,
                    reason="intel-extension-for-pytorch is installed in this venv")
def test_ipex_backend_without_ipex_fails_saying_what_to_install():
    backend = platforms.get("xpu").attention_backend("ipex")
    key = torch.zeros(1, 1, 8)
    cache = torch.zeros(backend.kv_cache_shape(1, 16, 1, 8))
    with pytest.raises(ImportError, match="intel-extension-for-pytorch==2.8.0"):
        backend.write_kv(key, key, cache, cache.clone(), torch.tensor([0]))
