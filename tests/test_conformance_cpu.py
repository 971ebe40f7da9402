"""The conformance matrix on the CPU backends, and proof that the harness fails.

The CPU rows run the quick (all-pairs) subset of the matrix; the full matrix
is `python -m ci.conformance --platform cpu`. Each deliberately broken
backend below has exactly one bug a real kernel could have, and the harness
must report it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import platforms
from ci import conformance, matrix
from ci.batches import build_batch, poisoned_caches
from ci.conformance import FAIL, PASS, SKIP, format_row, run_backend, run_cases
from platforms.cpu.fast import FastCpuBackend
from platforms.cpu.reference import ReferenceBackend, write_kv_nhd

CPU = torch.device("cpu")
QUICK_CASES = matrix.cases("cpu", quick=True)
#: one small case per batch shape, for the broken backends
PROBE_CASES = [matrix.Case(torch.float32, 64, 16, 8, 2, batch)
               for batch in matrix.FULL.batch_shapes]


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
@pytest.mark.parametrize("case", QUICK_CASES, ids=lambda case: case.id)
def test_cpu_backend_matches_float64_oracle(backend_name, case):
    [result] = run_cases("cpu", backend_name, [case])
    assert result.status == PASS, format_row(result)
    assert result.cache_ok


class IgnoresCausalOffset(ReferenceBackend):
    """Masks as if each sequence's new tokens started at position 0.

    Query i then sees keys 0..i, which is what the reference computes for a
    sequence whose seq_len equals its query length.
    """

    name = "ignores-causal-offset"

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping, block_tables,
                seq_lens, query_start_loc, scale, max_seq_len=None, max_query_len=None):
        query_lens = (query_start_loc[1:] - query_start_loc[:-1]).to(seq_lens.dtype)
        return super().forward(query, key, value, key_cache, value_cache, slot_mapping,
                               block_tables, query_lens, query_start_loc, scale)


class GathersOneBlockTooMany(ReferenceBackend):
    """Reads one block past each sequence's last and trusts the causal mask to hide it.

    Like a kernel looping over whole blocks plus one, with its block-table reads
    clamped into the pool: the keys past seq_len (the last block's padding
    slots, then the next table entry's block) get probability 0, yet their NaN
    poison reaches `probs @ v` (0 * NaN). Built on the reference by giving each
    sequence masked query rows up to the end of that extra block, and then
    dropping them: the real rows keep their positions and see the extra keys
    only as masked ones.
    """

    name = "gathers-one-block-too-many"

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping, block_tables,
                seq_lens, query_start_loc, scale, max_seq_len=None, max_query_len=None):
        block_size = key_cache.shape[1]
        read_lens = ((seq_lens + block_size - 1) // block_size + 1) * block_size
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        padded_start = torch.zeros_like(query_start_loc)
        padded_start[1:] = torch.cumsum(query_lens + read_lens - seq_lens, 0)
        # row of each real token among the padded ones: the extra rows follow each sequence's
        rows = torch.arange(len(query)) + torch.repeat_interleave(
            padded_start[:-1] - query_start_loc[:-1], query_lens)

        def padded(x, fill):
            out = x.new_full((int(padded_start[-1]), *x.shape[1:]), fill)
            out[rows] = x
            return out

        out = super().forward(padded(query, 0), padded(key, 0), padded(value, 0), key_cache,
                              value_cache, padded(slot_mapping, -1),
                              block_tables.clamp(0, key_cache.shape[0] - 1), read_lens,
                              padded_start, scale)
        return out[rows]


class SkipsWriteKv(ReferenceBackend):
    """Attends correctly (over a private copy of the caches) but never writes them."""

    name = "skips-write-kv"

    def forward(self, query, key, value, key_cache, value_cache, *args, **hints):
        return super().forward(query, key, value, key_cache.clone(), value_cache.clone(),
                               *args, **hints)


def test_harness_fails_a_backend_that_ignores_the_causal_offset():
    results = run_backend(IgnoresCausalOffset(), PROBE_CASES, CPU)
    for result in results:
        # a prefill-only batch has no offset to ignore
        has_context = any(context > 0 for context, _ in result.case.batch.seqs)
        assert result.failed == has_context, format_row(result)
    assert any(result.failed for result in results)


def test_harness_fails_a_backend_that_reads_poisoned_slots():
    results = run_backend(GathersOneBlockTooMany(), PROBE_CASES, CPU)
    for result in results:
        assert result.status == FAIL, format_row(result)
        assert result.rel_err != result.rel_err, "the NaN poison should reach the output"
        assert result.cache_ok


@pytest.mark.parametrize("case", PROBE_CASES, ids=lambda case: case.id)
def test_reading_one_block_too_many_is_harmless_but_for_the_poison(case):
    """With zeros where the poison was, the broken backend is the reference: the harness
    catches it by its reads alone."""
    batch = build_batch(case)
    nhd = (batch.num_blocks, batch.block_size, case.num_kv_heads, case.head_size)
    outs = []
    for backend in (ReferenceBackend(), GathersOneBlockTooMany()):
        caches = poisoned_caches(batch, nhd, case.dtype, CPU, write_kv_nhd,
                                 with_new_tokens=False)
        outs.append(backend.forward(
            batch.query, batch.key, batch.value, *(c.nan_to_num(0.0) for c in caches),
            batch.slot_mapping, batch.block_tables, batch.seq_lens, batch.query_start_loc,
            batch.scale))
    torch.testing.assert_close(outs[1], outs[0])


def test_harness_fails_a_backend_that_skips_write_kv():
    for result in run_backend(SkipsWriteKv(), PROBE_CASES, CPU):
        assert result.status == FAIL, format_row(result)
        assert result.cache_ok is False
        assert result.rel_err <= result.case.tolerance, "only the cache is wrong"


class Fp32Only(FastCpuBackend):
    name = "fp32-only"
    supported_dtypes = (torch.float32,)
    supported_head_sizes = (64, 128)


def test_unsupported_dtypes_and_head_sizes_are_skipped_not_passed():
    cases = matrix.Matrix(matrix.FULL.dtypes, (64, 80), (16,), ((8, 2),),
                          (matrix.TINY_MIXED,)).cases()
    results = run_backend(Fp32Only(), cases, CPU)
    for result in results:
        supported = result.case.dtype == torch.float32 and result.case.head_size in (64, 128)
        assert (result.status == PASS) == supported, format_row(result)
        assert (result.status == SKIP) == (not supported), format_row(result)


def test_quick_subset_covers_every_pair_of_axis_values():
    full, quick = matrix.FULL, matrix.QUICK.cases()
    axes = [full.dtypes, full.head_sizes, full.block_sizes, full.head_configs,
            full.batch_shapes]

    def values(case):
        return (case.dtype, case.head_size, case.block_size,
                (case.num_heads, case.num_kv_heads), case.batch)

    covered = {(i, v[i], j, v[j]) for v in map(values, quick)
               for i, j in itertools.combinations(range(len(axes)), 2)}
    for i, j in itertools.combinations(range(len(axes)), 2):
        for a, b in itertools.product(axes[i], axes[j]):
            assert (i, a, j, b) in covered
    assert len(quick) < len(full.cases()) // 10


def test_full_matrix_spans_the_specified_axes():
    cases = matrix.cases("cpu")
    assert {case.dtype for case in cases} == {torch.float32, torch.float16, torch.bfloat16}
    assert {case.head_size for case in cases} == {64, 80, 128, 256}
    assert {case.block_size for case in cases} == {8, 16, 32}
    assert ({(case.num_heads, case.num_kv_heads) for case in cases}
            == {(8, 8), (8, 2), (32, 8), (16, 1)})
    seqs = [seq for case in cases for seq in case.batch.seqs]
    contexts = [context for context, new in seqs if context > 0]
    assert min(contexts) == 1 and max(contexts) > 2048
    assert any(new == 1 and context > 0 for context, new in seqs), "decode"
    assert any(new > 1 and context > 0 for context, new in seqs), "chunked prefill"
    assert len({case.seed for case in cases}) == len(cases)


def _unloadable(name):
    def factory():
        raise ImportError(f"no module for {name} here")
    return factory


@pytest.fixture
def vendors_unloadable(monkeypatch):
    """cuda/rocm/xpu fail to load; the runner sees one small case per backend."""
    for name in ("cuda", "rocm", "xpu"):
        monkeypatch.setitem(platforms._FACTORIES, name, _unloadable(name))
        monkeypatch.delitem(platforms._INSTANCES, name, raising=False)
    monkeypatch.setattr(conformance, "matrix_cases", lambda platform, quick: PROBE_CASES[:1])


def test_cli_on_cpu_never_touches_other_platforms(vendors_unloadable, capsys):
    assert conformance.main(["--platform", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cpu/fast" in out and "cpu/reference" in out and "cuda" not in out


def test_cli_reports_an_unloadable_platform_instead_of_crashing(vendors_unloadable, capsys):
    assert conformance.main(["--platform", "xpu"]) == 2
    assert "xpu: not run: cannot load platform 'xpu': ImportError" in capsys.readouterr().out
    assert conformance.main([]) == 0, "absent vendors are not failures in a sweep"
    summary = capsys.readouterr().out.split("== summary ==")[1]
    assert "cpu/fast" in summary and "rocm             not run" in summary


def test_cli_exit_status_is_nonzero_on_a_failure(vendors_unloadable, monkeypatch, capsys):
    monkeypatch.setattr(platforms.get("cpu"), "_make_backend",
                        lambda name: SkipsWriteKv())
    assert conformance.main(["--platform", "cpu", "--backend", "reference"]) == 1
    assert "FAIL" in capsys.readouterr().out
