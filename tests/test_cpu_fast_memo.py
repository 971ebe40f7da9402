"""The fast CPU backend reuses a step's index work across layers, never across steps.

`FastCpuBackend` memoizes its grouping and gather rows by the content of
`block_tables`, `seq_lens` and `query_start_loc`. Every layer of a step
passes equal metadata (with other caches and queries) and must get its own
answer; metadata changed in place, in the very same tensors, is a new step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ci.batches import build_batch, poisoned_caches
from ci.conformance import compare, oracle_output
from ci.matrix import DECODE, MIXED, Case
from cpu_threads import single_torch_thread  # noqa: F401
from platforms.cpu.fast import FastCpuBackend
from platforms.cpu.reference import write_kv_nhd

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CPU = torch.device("cpu")


def forward(backend, batch, case, metadata=None):
    """`backend.forward` on the batch's poisoned caches -> worst normalized error vs the oracle.

    `metadata` = (block_tables, seq_lens, query_start_loc) tensors to pass
    instead of the batch's own (equal in content).
    """
    shape = (batch.num_blocks, case.block_size, case.num_kv_heads, case.head_size)
    key_cache, value_cache = poisoned_caches(batch, shape, case.dtype, CPU, write_kv_nhd,
                                             with_new_tokens=False)
    block_tables, seq_lens, query_start_loc = metadata or (
        batch.block_tables, batch.seq_lens, batch.query_start_loc)
    out = backend.forward(batch.query, batch.key, batch.value, key_cache, value_cache,
                          batch.slot_mapping, block_tables, seq_lens, query_start_loc,
                          batch.scale)
    return compare(out, oracle_output(batch))[1]


def with_new_data(batch, head_size: int):
    """`batch` with the same metadata and fresh queries and K/V of another head size."""
    def fresh(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(*tensor.shape[:-1], head_size, dtype=tensor.dtype)

    return dataclasses.replace(
        batch, query=2 * fresh(batch.query), key=fresh(batch.key), value=fresh(batch.value),
        context_key=fresh(batch.context_key), context_value=fresh(batch.context_value),
        scale=head_size ** -0.5)


@pytest.mark.parametrize("shape", [DECODE, MIXED], ids=lambda shape: shape.name)
def test_layers_of_one_step_share_metadata_not_data(shape):
    """Two "layers": the same metadata tensors, other queries, caches and head sizes."""
    torch.manual_seed(0)
    backend = FastCpuBackend()
    first = Case(torch.float32, 64, 16, 8, 2, shape)
    second = Case(torch.float32, 128, 16, 8, 2, shape)
    first_batch = build_batch(first)
    second_batch = with_new_data(first_batch, second.head_size)
    metadata = (first_batch.block_tables, first_batch.seq_lens, first_batch.query_start_loc)
    assert forward(backend, first_batch, first, metadata) <= first.tolerance
    assert forward(backend, second_batch, second, metadata) <= second.tolerance


def test_metadata_changed_in_place_is_a_new_step():
    backend = FastCpuBackend()
    first = Case(torch.float32, 64, 16, 8, 2, DECODE)
    second = Case(torch.float32, 128, 16, 8, 2, DECODE)
    first_batch, second_batch = build_batch(first), build_batch(second)
    assert not torch.equal(first_batch.block_tables, second_batch.block_tables)
    metadata = (first_batch.block_tables.clone(), first_batch.seq_lens.clone(),
                first_batch.query_start_loc.clone())
    assert forward(backend, first_batch, first, metadata) <= first.tolerance
    for tensor, new in zip(metadata, (second_batch.block_tables, second_batch.seq_lens,
                                      second_batch.query_start_loc)):
        tensor.copy_(new)
    # A memo keyed on the tensors' identity would gather the first step's blocks (NaN here).
    assert forward(backend, second_batch, second, metadata) <= second.tolerance
