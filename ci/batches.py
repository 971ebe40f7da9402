"""One conformance case's paged batch: random data, random block tables, poison.

Everything a kernel must not read is made harmful to read: block ids are a
random permutation (a kernel assuming contiguous blocks reads the wrong
ones), block-table entries past a sequence's used blocks hold negative,
out-of-range or foreign block ids, and the caches are NaN everywhere except
the slots the batch owns (see `poisoned_caches`), so every cache block the
batch does not own and every padding slot past a sequence's last token is
NaN.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ci.matrix import Case

#: query scale: logits of std ~2 give peaked attention, so one misplaced key shows
QUERY_STD = 2.0

KvWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    None]


@dataclass
class PagedBatch:
    """A case's inputs on the CPU, in the case's dtype.

    query [num_tokens, num_heads, head_size]; key/value [num_tokens,
    num_kv_heads, head_size] (the new tokens, packed over sequences);
    slot_mapping [num_tokens] int64; context_key/context_value
    [num_context_tokens, num_kv_heads, head_size] with context_slots
    [num_context_tokens] int64 (the cached context, written before forward);
    block_tables [num_seqs, max_blocks] int32; seq_lens [num_seqs] int32;
    query_start_loc [num_seqs + 1] int32.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    slot_mapping: torch.Tensor
    context_key: torch.Tensor
    context_value: torch.Tensor
    context_slots: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    num_blocks: int
    block_size: int
    scale: float
    max_seq_len: int
    max_query_len: int


def build_batch(case: Case) -> PagedBatch:
    """Fresh random inputs for `case`, seeded by the case (reproducible)."""
    gen = torch.Generator().manual_seed(case.seed)
    seqs = case.batch.seqs
    seq_lens = [context + new for context, new in seqs]
    blocks_per_seq = [math.ceil(seq_len / case.block_size) for seq_len in seq_lens]
    block_tables, num_blocks = _block_tables(blocks_per_seq, gen)
    context_slots = _slots(block_tables, case.block_size,
                           [(0, context) for context, _ in seqs])
    slot_mapping = _slots(block_tables, case.block_size,
                          [(context, context + new) for context, new in seqs])

    def randn(num_tokens: int, num_heads: int, std: float = 1.0) -> torch.Tensor:
        data = torch.randn(num_tokens, num_heads, case.head_size, generator=gen) * std
        return data.to(case.dtype)

    query_lens = [new for _, new in seqs]
    num_tokens, num_context = sum(query_lens), len(context_slots)
    return PagedBatch(
        query=randn(num_tokens, case.num_heads, QUERY_STD),
        key=randn(num_tokens, case.num_kv_heads),
        value=randn(num_tokens, case.num_kv_heads),
        slot_mapping=slot_mapping,
        context_key=randn(num_context, case.num_kv_heads),
        context_value=randn(num_context, case.num_kv_heads),
        context_slots=context_slots,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32),
        num_blocks=num_blocks,
        block_size=case.block_size,
        scale=case.head_size ** -0.5,
        max_seq_len=max(seq_lens),
        max_query_len=max(query_lens),
    )


def _block_tables(blocks_per_seq: list[int], gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Shuffled block ids for each sequence; garbage in every unused entry.

    Returns (block_tables [num_seqs, max_blocks + 2] int32, num_blocks); the
    cache holds a third more blocks than the batch owns, all left poisoned.
    """
    owned = sum(blocks_per_seq)
    num_blocks = owned + max(4, owned // 3)
    width = max(blocks_per_seq) + 2
    garbage = torch.randint(-num_blocks, 2 * num_blocks, (len(blocks_per_seq), width),
                            generator=gen)
    block_tables = garbage.to(torch.int32)
    shuffled = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    start = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = shuffled[start:start + count]
        start += count
    return block_tables, num_blocks


def _slots(block_tables: torch.Tensor, block_size: int,
           spans: list[tuple[int, int]]) -> torch.Tensor:
    """Cache slots [num_tokens] int64 of positions [start, end) of each sequence."""
    slots = []
    for seq, (start, end) in enumerate(spans):
        positions = torch.arange(start, end)
        blocks = block_tables[seq, positions // block_size].long()
        slots.append(blocks * block_size + positions % block_size)
    return torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64)


def poisoned_caches(batch: PagedBatch, cache_shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device, write_kv: KvWriter,
                    with_new_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-filled K/V caches holding the context (and the new tokens if asked).

    `write_kv` stores tokens in whatever layout `cache_shape` is.
    """
    key_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    value_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    write_kv(batch.context_key.to(device), batch.context_value.to(device), key_cache,
             value_cache, batch.context_slots.to(device))
    if with_new_tokens:
        write_kv(batch.key.to(device), batch.value.to(device), key_cache, value_cache,
                 batch.slot_mapping.to(device))
    return key_cache, value_cache
