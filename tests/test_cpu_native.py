"""The compiled CPU kernels (platforms/cpu/native.py): built once, exact, optional.

The conformance matrix (test_conformance_cpu.py) already runs the fast
backend, whose float32/bfloat16 decode rows go to the decode kernel; here:
that kernel on its own over threads and head sizes of both code paths (a
fixed head size, and one read at run time), queries that are strided views,
the cache write, bad slots and block ids, the build cache, the PyTorch path
a machine without a C++ compiler keeps, and the fused elementwise ops of
the bfloat16 CPU forward against the plain layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from ci.batches import build_batch, poisoned_caches
from ci.conformance import compare, oracle_output
from ci.matrix import DECODE, MIXED, Case
from engine import LLM, SamplingParams
from engine.models.fused_forward import FusedLlamaForward
from engine.models.layers import RMSNorm, RotaryEmbedding, apply_rotary
from platforms.cpu import native
from platforms.cpu.fast import FastCpuBackend
from platforms.cpu.fused_ops import cpu_fused_ops
from platforms.cpu.reference import write_kv_nhd
from tiny_models import tiny_model_factory  # noqa: F401

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernel() -> native.CpuKernels:
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler (g++/c++ or $CXX) on this machine: the kernels "
                    "cannot be built, and the fast backend runs its PyTorch paths")
    kernel = native.cpu_kernels()
    assert kernel is not None, "a compiler is here: the kernels must build"
    return kernel


def caches(batch, case):
    shape = (batch.num_blocks, case.block_size, case.num_kv_heads, case.head_size)
    return poisoned_caches(batch, shape, case.dtype, CPU, write_kv_nhd, with_new_tokens=True)


def decode_rows(batch):
    """(seq_ids, seq_lens, token_rows) int64 of the batch's one-token sequences."""
    query_lens = batch.query_start_loc[1:] - batch.query_start_loc[:-1]
    seq_ids = (query_lens == 1).nonzero().flatten()
    return seq_ids, batch.seq_lens[seq_ids].long(), batch.query_start_loc[seq_ids].long()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_size,num_heads,num_kv_heads",
                         [(64, 8, 2), (128, 32, 8), (80, 12, 3), (96, 16, 1)])
def test_kernel_matches_the_float64_oracle(kernel, threads, dtype, head_size, num_heads,
                                           num_kv_heads):
    torch.manual_seed(head_size + num_heads)
    case = Case(dtype, head_size, 16, num_heads, num_kv_heads, DECODE)
    batch = build_batch(case)
    key_cache, value_cache = caches(batch, case)
    seq_ids, seq_lens, token_rows = decode_rows(batch)
    out = torch.full_like(batch.query, float("nan"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel.decode(batch.query, key_cache, value_cache, batch.block_tables, seq_ids,
                      seq_lens, token_rows, batch.scale, out)
    finally:
        torch.set_num_threads(previous)
    assert compare(out, oracle_output(batch))[1] <= case.tolerance


def test_kernel_reads_strided_queries_and_writes_only_decode_rows(kernel):
    """Queries as a view into a packed qkv tensor; prefill rows of `out` stay untouched."""
    torch.manual_seed(1)
    case = Case(torch.bfloat16, 64, 8, 8, 2, MIXED)
    batch = build_batch(case)
    key_cache, value_cache = caches(batch, case)
    qkv = torch.randn(len(batch.query), 12, 64, dtype=case.dtype)
    qkv[:, :8] = batch.query
    query = qkv[:, :8]
    assert not query.is_contiguous()
    seq_ids, seq_lens, token_rows = decode_rows(batch)
    out = torch.full_like(batch.query, float("nan"))
    kernel.decode(query, key_cache, value_cache, batch.block_tables, seq_ids, seq_lens,
                  token_rows, batch.scale, out)
    expected = oracle_output(batch)
    assert compare(out[token_rows], expected[token_rows])[1] <= case.tolerance
    others = torch.ones(len(out), dtype=torch.bool)
    others[token_rows] = False
    assert out[others].isnan().all()


def test_second_build_loads_the_cached_library(kernel):
    compiler = native.find_compiler()
    first = native.build(compiler)
    built_at = first.stat().st_mtime_ns
    assert native.build(compiler) == first and first.stat().st_mtime_ns == built_at


def test_without_a_compiler_the_pytorch_path_serves_decode(monkeypatch, caplog):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    assert native.cpu_kernels() is None
    assert "no C++ compiler" in caplog.text
    for dtype in (torch.float32, torch.bfloat16):
        case = Case(dtype, 64, 16, 8, 2, DECODE)
        batch = build_batch(case)
        key_cache, value_cache = caches(batch, case)
        out = FastCpuBackend().forward(batch.query, batch.key, batch.value, key_cache,
                                       value_cache, batch.slot_mapping, batch.block_tables,
                                       batch.seq_lens, batch.query_start_loc, batch.scale)
        assert compare(out, oracle_output(batch))[1] <= case.tolerance


def test_out_of_range_slots_and_blocks_are_value_errors_that_touch_nothing(kernel):
    torch.manual_seed(2)
    case = Case(torch.float32, 64, 16, 8, 2, DECODE)
    batch = build_batch(case)
    key_cache, value_cache = caches(batch, case)
    before = key_cache.clone()
    slots = batch.slot_mapping.clone()
    slots[-1] = key_cache.shape[0] * key_cache.shape[1]
    with pytest.raises(ValueError, match="slot_mapping"):
        kernel.write_kv(batch.key, batch.value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.isnan(), before.isnan())
    seq_ids, seq_lens, token_rows = decode_rows(batch)
    tables = batch.block_tables.clone()
    tables[seq_ids[-1], 0] = key_cache.shape[0]
    out = torch.full_like(batch.query, float("nan"))
    with pytest.raises(ValueError, match="block_tables"):
        kernel.decode(batch.query, key_cache, value_cache, tables, seq_ids, seq_lens,
                      token_rows, batch.scale, out)
    with pytest.raises(ValueError, match="block_tables"):
        kernel.decode(batch.query, key_cache, value_cache, batch.block_tables[:, :1], seq_ids,
                      seq_lens, token_rows, batch.scale, out)
    assert out.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_write_kv_equals_the_reference_write(kernel, dtype):
    """Strided K/V views, some slots -1: the same cache bytes as the reference scatter."""
    torch.manual_seed(3)
    qkv = torch.randn(40, 3, 4, 64, dtype=dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(8 * 16)[:40]
    slots[::7] = -1
    expected = [torch.full((8, 16, 4, 64), float("nan"), dtype=dtype) for _ in range(2)]
    actual = [cache.clone() for cache in expected]
    write_kv_nhd(key, value, *expected, slots)
    kernel.write_kv(key, value, *actual, slots)
    for a, e in zip(actual, expected):
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.nan_to_num(), e.nan_to_num())


@pytest.fixture(scope="module")
def fused_ops(kernel):
    ops = cpu_fused_ops()
    assert ops is not None
    return ops


def assert_close_to_plain(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: rounding-level; bfloat16: at most one unit in the last place (the
    fused ops sum and exponentiate in another order, then round where the plain ops do)."""
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        ulp = expected.float().abs().clamp_min(1e-30) * 2.0 ** -7
        assert bool(((actual.float() - expected.float()).abs() <= ulp).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_ops_round_where_the_plain_layers_do(fused_ops, dtype):
    torch.manual_seed(4)
    x, residual = (torch.randn(37, 576).to(dtype) for _ in range(2))
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = torch.randn(576).to(dtype)
    summed = residual.clone()
    out = fused_ops.rms_norm(x, norm.weight, norm.eps, summed)
    assert torch.equal(summed, x + residual), "the residual add rounds once, as x + residual"
    assert_close_to_plain(out, norm(x + residual))
    assert_close_to_plain(fused_ops.rms_norm(x, norm.weight, norm.eps), norm(x))

    gate_up = 4 * torch.randn(37, 2 * 300).to(dtype)
    assert_close_to_plain(fused_ops.silu_and_mul(gate_up),
                          F.silu(gate_up[:, :300]) * gate_up[:, 300:])

    qkv = torch.randn(37, 15, 64).to(dtype)
    query, key = qkv[:, :9], qkv[:, 9:12]
    positions = torch.randint(0, 100, (37,))
    cos, sin = RotaryEmbedding(LlamaConfig(), 64).cos_sin(torch.arange(128), dtype)
    expected = [apply_rotary(t, cos[positions], sin[positions]) for t in (query, key)]
    fused_ops.rotary_(query, key, positions, cos, sin)
    assert_close_to_plain(query, expected[0])
    assert_close_to_plain(key, expected[1])
    assert torch.equal(qkv[:, 12:], qkv[:, 12:].clone()), "values untouched"


@pytest.mark.parametrize("dtype,fused", [("bfloat16", True), ("float32", False)])
def test_cpu_engine_runs_the_fused_forward_in_bfloat16_only(kernel, tiny_model_factory, dtype,
                                                            fused):
    """float32 keeps the plain layers: op for op as HF, for bit-equal float32 references."""
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", dtype=dtype, max_model_len=64)
    runner = llm.llm_engine.model_runner
    assert isinstance(runner.forward_fn, FusedLlamaForward) == fused
    outputs = llm.generate(["hello world"], SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 4
