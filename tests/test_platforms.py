"""The platform registry: lookup, detection and backend selection."""

from __future__ import annotations

import logging

import pytest

import platforms
from platforms.cpu.fast import FastCpuBackend
from platforms.cpu.reference import ReferenceBackend


def test_unknown_platform_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="nvidia") as error:
        platforms.get("nvidia")
    for known in ("cpu", "cuda", "rocm", "xpu"):
        assert known in str(error.value)


def test_detect_picks_cpu_here_and_logs_why(monkeypatch, caplog):
    monkeypatch.delenv("PAGEDLLM_DEVICE", raising=False)
    with caplog.at_level(logging.INFO, logger="platforms"):
        platform = platforms.detect()
    assert platform.name == "cpu"
    assert platform.detect_reason.startswith("no accelerator found")
    for vendor in ("cuda", "rocm", "xpu"):
        assert vendor in platform.detect_reason.lower()
    assert f"platform cpu selected: {platform.detect_reason}" in caplog.messages


def test_detect_treats_a_vendor_that_fails_to_load_as_absent(monkeypatch):
    def broken():
        raise ImportError("vendor stack missing")

    monkeypatch.delenv("PAGEDLLM_DEVICE", raising=False)
    monkeypatch.setitem(platforms._FACTORIES, "cuda", broken)
    monkeypatch.delitem(platforms._INSTANCES, "cuda", raising=False)
    platform = platforms.detect()
    assert platform.name == "cpu"
    assert "'cuda' failed to load (ImportError: vendor stack missing)" in platform.detect_reason


@pytest.mark.parametrize("env", ["cpu", "auto"])
def test_detect_honours_pagedllm_device(monkeypatch, env):
    monkeypatch.setenv("PAGEDLLM_DEVICE", env)
    platform = platforms.detect()
    assert platform.name == "cpu"
    expected = "PAGEDLLM_DEVICE=cpu" if env == "cpu" else "no accelerator found"
    assert platform.detect_reason.startswith(expected)


def test_explicit_name_beats_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEDLLM_DEVICE", "nvidia")
    assert platforms.detect("cpu").detect_reason == "asked for explicitly ('cpu')"
    with pytest.raises(ValueError, match="known platforms"):
        platforms.detect()


def test_cpu_default_backend_is_the_fast_one_and_reference_is_the_oracle():
    cpu = platforms.get("cpu")
    assert type(cpu.attention_backend()) is FastCpuBackend
    assert type(cpu.attention_backend("fast")) is FastCpuBackend
    assert type(cpu.attention_backend("reference")) is ReferenceBackend
    assert cpu.backend_names() == ["fast", "reference"]


def test_unknown_backend_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*fast, reference"):
        platforms.get("cpu").attention_backend("nope")


def test_get_works_without_the_hardware():
    cpu = platforms.get("cpu")
    assert cpu.is_available()
    assert str(cpu.torch_device()) == "cpu"
    total, free = cpu.memory_info()
    assert 0 < free <= total
