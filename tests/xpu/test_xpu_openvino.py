"""The xpu/openvino backend on CPU tensors: conformance rows and its limits.

OpenVINO's CPU plugin lays the KV cache out in blocks of 32 tokens only, so
the rows are the all-pairs subset of the matrix at block_size 32 (every
dtype, head size, head configuration and batch shape, each pair of them
at least once).
"""

from __future__ import annotations

import pytest
import torch

import platforms
from ci.conformance import PASS, format_row, run_cases
from ci.matrix import FULL, Matrix
from platforms.cpu.reference import ReferenceBackend
from platforms.xpu.openvino_model import compiled_model

CPU_BLOCK_SIZE = 32
CASES = Matrix(FULL.dtypes, FULL.head_sizes, (CPU_BLOCK_SIZE,), FULL.head_configs,
               FULL.batch_shapes, all_pairs=True).cases()


@pytest.fixture(scope="module")
def backend():
    return platforms.get("xpu").attention_backend("openvino")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_openvino_backend_matches_float64_oracle(case):
    [result] = run_cases("xpu", "openvino", [case], device="cpu")
    assert result.status == PASS, format_row(result)
    assert result.cache_ok


def test_block_size_is_the_cpu_plugins(backend):
    assert backend.supported_block_sizes == (CPU_BLOCK_SIZE,)
    assert backend.kv_cache_shape(5, CPU_BLOCK_SIZE, 2, 64) == (5, 2, CPU_BLOCK_SIZE, 64)
    with pytest.raises(ValueError, match="block_size 16"):
        backend.kv_cache_shape(5, 16, 2, 64)


def test_write_kv_skips_slot_minus_one_and_matches_the_reference_layout(backend):
    key, value = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    slot_mapping = torch.tensor([5, -1, 40])
    caches = [torch.zeros(backend.kv_cache_shape(2, CPU_BLOCK_SIZE, 2, 64)) for _ in "kv"]
    backend.write_kv(key, value, *caches, slot_mapping)
    nhd = [torch.zeros(2, CPU_BLOCK_SIZE, 2, 64) for _ in "kv"]
    ReferenceBackend().write_kv(key, value, *nhd, slot_mapping)
    for cache, expected in zip(caches, nhd):
        assert torch.equal(cache.transpose(1, 2), expected)
    assert int((caches[0] != 0).any(dim=-1).sum()) == 2 * 2, "two tokens x two kv heads"


def _decode_step(backend, dtype, cache_dtype=None):
    """forward for one sequence decoding its 3rd token (2 cached)."""
    query = torch.randn(1, 4, 64).to(dtype)
    key = torch.randn(1, 2, 64).to(dtype)
    cache = torch.zeros(backend.kv_cache_shape(2, CPU_BLOCK_SIZE, 2, 64),
                        dtype=cache_dtype or dtype)
    return backend.forward(query, key, key.clone(), cache, cache.clone(),
                           torch.tensor([2]), torch.tensor([[1, 0]], dtype=torch.int32),
                           torch.tensor([3], dtype=torch.int32),
                           torch.tensor([0, 1], dtype=torch.int32), 0.125)


def test_a_model_is_compiled_once_per_shape(backend):
    _decode_step(backend, torch.float16)
    compiled = compiled_model.cache_info().misses
    out = _decode_step(backend, torch.float16)
    assert compiled_model.cache_info().misses == compiled
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_bad_input_is_a_value_error_naming_the_field(backend):
    with pytest.raises(ValueError, match="key_cache"):
        _decode_step(backend, torch.float32, cache_dtype=torch.float16)
    with pytest.raises(ValueError, match="query is on meta"):
        backend.forward(*(torch.empty(1, 1, 64, device="meta") for _ in range(3)),
                        *(None,) * 6, 0.125)
