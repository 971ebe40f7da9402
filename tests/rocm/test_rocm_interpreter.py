"""The rocm "triton" backend against the float64 oracle, in the Triton interpreter.

Without a GPU the kernels run in the interpreter on CPU tensors (see
conftest.py); with a CUDA device the same rows run compiled on it. The
conformance matrix's own rows take the interpreter 1 to 25 s each on a
2-core machine, so these rows use short batches that still mix prefill,
chunked prefill and decode, span several key tiles and pages, and end
mid-page; `ci.batches` poisons everything a kernel must not read
(NaN caches, garbage block-table entries). bf16 runs with the dot operands
upcast to fp32, which the interpreter needs (`UPCAST_DOT`); bf16 on the
tensor cores is covered by the full matrix on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from ci.batches import build_batch, poisoned_caches
from ci.conformance import PASS, compare, format_row, oracle_output, run_cases
from ci.matrix import BatchShape, Case
from platforms.cpu.reference import write_kv_nhd
from platforms.rocm import tuning
from platforms.rocm.backend import TritonAttentionBackend
from platforms.rocm.triton_attention import paged_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: (cached context, new tokens) per sequence
SHORT_MIXED = BatchShape("short-mixed", ((0, 9), (5, 3), (40, 1), (0, 1), (70, 17)))
SHORT_DECODE = BatchShape("short-decode", ((0, 1), (15, 1), (16, 1), (33, 1), (130, 1)),
                          hints=False)
CHUNKED = BatchShape("chunked", ((100, 20), (64, 64)), hints=False)
#: long enough for several key tiles per split
LONG_DECODE = BatchShape("long-decode", ((0, 1), (300, 1), (47, 1), (600, 1)))

ROWS = [
    Case(torch.float32, 64, 16, 8, 2, SHORT_MIXED),
    Case(torch.float32, 128, 8, 8, 8, SHORT_DECODE),
    Case(torch.float32, 80, 32, 16, 1, CHUNKED),
    Case(torch.float16, 64, 16, 32, 8, SHORT_MIXED),
    Case(torch.float16, 128, 16, 8, 2, SHORT_DECODE),
    Case(torch.float16, 256, 8, 8, 8, SHORT_MIXED),
    Case(torch.float16, 80, 16, 16, 1, CHUNKED),
    Case(torch.float16, 64, 32, 8, 2, CHUNKED),
    Case(torch.bfloat16, 64, 16, 8, 2, SHORT_MIXED),
]


@pytest.mark.parametrize("case", ROWS, ids=lambda case: case.id)
def test_triton_backend_matches_float64_oracle(case):
    [result] = run_cases("rocm", "triton", [case], DEVICE)
    assert result.status == PASS, format_row(result)
    assert result.cache_ok


@pytest.mark.parametrize("dtype,num_splits", [(torch.float32, 2), (torch.float16, 3),
                                              (torch.float16, 16)])
def test_split_kv_decode_matches_float64_oracle(dtype, num_splits):
    """Splits past a short sequence's last key hold nothing and must weigh nothing."""
    case = Case(dtype, 64, 16, 8, 2, LONG_DECODE)
    batch = build_batch(case)
    shape = (batch.num_blocks, case.block_size, case.num_kv_heads, case.head_size)
    key_cache, value_cache = poisoned_caches(batch, shape, dtype, DEVICE, write_kv_nhd,
                                             with_new_tokens=True)
    config = tuning.attention_config(tuning.target_backend(), case.head_size,
                                     case.num_heads // case.num_kv_heads, max_query_len=1,
                                     itemsize=dtype.itemsize)
    out = paged_attention(batch.query.to(DEVICE), key_cache, value_cache,
                          batch.block_tables.to(DEVICE), batch.seq_lens.to(DEVICE),
                          batch.query_start_loc.to(DEVICE), batch.scale, config, num_splits)
    _, rel_err = compare(out.cpu(), oracle_output(batch))
    assert rel_err <= case.tolerance


def test_int64_index_tensors_give_the_int32_result():
    case = Case(torch.float16, 64, 16, 8, 2, SHORT_MIXED)
    batch = build_batch(case)
    shape = (batch.num_blocks, case.block_size, case.num_kv_heads, case.head_size)
    outputs = []
    for index_dtype in (torch.int32, torch.int64):
        caches = poisoned_caches(batch, shape, case.dtype, DEVICE, write_kv_nhd,
                                 with_new_tokens=False)
        indices = [t.to(DEVICE, index_dtype) for t in (batch.block_tables, batch.seq_lens,
                                                        batch.query_start_loc)]
        outputs.append(TritonAttentionBackend().forward(
            batch.query.to(DEVICE), batch.key.to(DEVICE), batch.value.to(DEVICE), *caches,
            batch.slot_mapping.to(DEVICE), *indices, batch.scale))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_stores_each_slot_and_skips_negative_ones(dtype):
    num_blocks, block_size, num_kv_heads, head_size = 5, 8, 2, 80
    key = torch.randn(6, num_kv_heads, head_size).to(dtype)
    value = torch.randn(6, num_kv_heads, head_size).to(dtype)
    slot_mapping = torch.tensor([3, -1, 17, 0, -1, 39])
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    caches = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(4)]
    write_kv_nhd(key, value, caches[0], caches[1], slot_mapping)
    on_device = [cache.to(DEVICE) for cache in caches[2:]]
    TritonAttentionBackend().write_kv(key.to(DEVICE), value.to(DEVICE), *on_device,
                                      slot_mapping.to(DEVICE))
    for expected, actual in zip(caches[:2], on_device):
        torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0, equal_nan=True)
