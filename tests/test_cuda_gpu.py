"""The CUDA kernels on a GPU: conformance rows, kernel-specific edge cases, build cache.

The quick (all-pairs) subset of the conformance matrix runs here; the full
matrix is `python -m ci.conformance --platform cuda` (benchmarks/gpu_kernels.sh).
The extra cases reach paths the matrix does not: head size 96, a GQA group
of 32 (two CTAs per KV head), contexts split into dozens of partitions some
of which are empty, sequences with no new token, strided and misaligned
inputs, and CUDA-graph capture (no host sync when the hints are given).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ci.batches import build_batch, poisoned_caches
from ci.conformance import PASS, format_row, run_backend, run_cases
from ci.matrix import BatchShape, Case, cases
from platforms.cpu.reference import write_kv_nhd
from platforms.cuda import build
from platforms.cuda.backend import CudaAttentionBackend

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]

LONG_DECODE = BatchShape("long-decode", ((17000, 1), (3, 1), (9000, 1)))
IDLE_SEQS = BatchShape("idle-seqs", ((40, 1), (100, 0), (7, 1)), hints=False)
IDLE_PREFILL = BatchShape("idle-prefill", ((0, 30), (50, 0), (10, 5)))
MIXED = BatchShape("mixed", ((0, 23), (100, 28), (2049, 1), (0, 1)))

EXTRA_CASES = [
    *(Case(dtype, 96, 16, 32, 8, batch)
      for dtype in (torch.float32, torch.float16, torch.bfloat16)
      for batch in (MIXED, LONG_DECODE)),
    *(Case(dtype, 128, 16, 32, 1, batch)
      for dtype in (torch.float32, torch.bfloat16) for batch in (MIXED, LONG_DECODE)),
    *(Case(dtype, 64, 8, 8, 2, batch)
      for dtype in (torch.float16, torch.float32) for batch in (IDLE_SEQS, IDLE_PREFILL)),
    Case(torch.bfloat16, 256, 32, 16, 2, LONG_DECODE),
]


@pytest.mark.parametrize("case", cases("cuda", quick=True), ids=lambda case: case.id)
def test_conformance_row(case):
    [result] = run_cases("cuda", "cuda", [case])
    assert result.status == PASS, format_row(result)


@pytest.mark.parametrize("case", EXTRA_CASES, ids=lambda case: case.id)
def test_kernel_edge_case_matches_oracle(case):
    [result] = run_backend(CudaAttentionBackend(), [case], DEVICE)
    assert result.status == PASS, format_row(result)


def _device_batch(case: Case):
    batch = build_batch(case)
    shape = (batch.num_blocks, case.block_size, case.num_kv_heads, case.head_size)
    caches = poisoned_caches(batch, shape, case.dtype, DEVICE, write_kv_nhd, with_new_tokens=False)
    meta = [t.to(DEVICE) for t in (batch.slot_mapping, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc)]
    return batch, caches, meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_strided_and_misaligned_inputs_give_the_contiguous_result(dtype):
    case = Case(dtype, 64, 16, 8, 2, MIXED)
    batch, (key_cache, value_cache), meta = _device_batch(case)
    q, k, v = (t.to(DEVICE) for t in (batch.query, batch.key, batch.value))
    backend = CudaAttentionBackend()
    expected = backend.forward(q, k, v, key_cache.clone(), value_cache.clone(), *meta,
                               batch.scale)
    # One packed qkv row per token, as a fused projection emits it; the extra
    # leading element misaligns every view by one element.
    num_tokens = q.shape[0]
    packed = torch.empty(num_tokens, 1 + (8 + 2 + 2) * 64, dtype=dtype, device=DEVICE)
    views = []
    for start, t in ((1, q), (1 + 8 * 64, k), (1 + 10 * 64, v)):
        view = packed[:, start:start + t.shape[1] * 64].view(num_tokens, t.shape[1], 64)
        view.copy_(t)
        views.append(view)
    out = backend.forward(*views, key_cache, value_cache, *meta, batch.scale)
    assert torch.equal(out, expected)


def test_decode_with_hints_captures_in_a_cuda_graph():
    case = Case(torch.bfloat16, 128, 16, 32, 8, LONG_DECODE)
    batch, (key_cache, value_cache), meta = _device_batch(case)
    q, k, v = (t.to(DEVICE) for t in (batch.query, batch.key, batch.value))
    backend = CudaAttentionBackend()

    def step():
        return backend.forward(q, k, v, key_cache, value_cache, *meta, batch.scale,
                               max_seq_len=batch.max_seq_len, max_query_len=1)

    eager = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, step())
    assert not torch.equal(captured, eager), "the replay must see the new query"


def _mutations():
    def retype(field, dtype):
        return lambda args: {**args, field: args[field].to(dtype)}

    return {
        "block_tables": retype("block_tables", torch.int64),
        "seq_lens": retype("seq_lens", torch.int64),
        "query_start_loc": retype("query_start_loc", torch.int64),
        "slot_mapping": retype("slot_mapping", torch.int32),
        "key_cache": lambda a: {**a, "key_cache": a["key_cache"].half()},
        "query": lambda a: {**a, "query": a["query"][..., :48]},
        "value": lambda a: {**a, "value": a["value"][:-1]},
        "scale": lambda a: {**a, "scale": float("nan")},
    }


@pytest.mark.parametrize("field", sorted(_mutations()))
def test_bad_input_is_a_value_error_naming_the_field(field):
    case = Case(torch.float32, 64, 16, 8, 2, MIXED)
    batch, (key_cache, value_cache), (slots, tables, seq_lens, starts) = _device_batch(case)
    args = dict(query=batch.query.to(DEVICE), key=batch.key.to(DEVICE),
                value=batch.value.to(DEVICE), key_cache=key_cache, value_cache=value_cache,
                slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                query_start_loc=starts, scale=batch.scale)
    with pytest.raises(ValueError, match=field):
        CudaAttentionBackend().forward(**_mutations()[field](args))


def test_second_start_reuses_the_cached_build():
    build.load_extension()
    capability = torch.cuda.get_device_capability()
    build_dir = build.cache_root() / build.build_hash(capability)
    [library] = build_dir.glob("*.so")
    before = library.stat().st_mtime_ns
    code = "from platforms.cuda.build import load_extension; load_extension()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert library.stat().st_mtime_ns == before, "a second start must not rebuild"
