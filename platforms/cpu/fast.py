"""The CPU default: PagedAttention over gathered context, one batched call per kind.

A step's sequences are split by what they need, and each kind is attended
in one batched call over its sequences padded to a common length:

- decode (one new token), bucketed by context length rounded up to a power
  of two (so padding at most doubles a bucket's work): float32 and bfloat16
  caches go to the compiled kernel of platforms/cpu/native.py, which reads
  each sequence's K/V rows straight from the paged cache once (scores,
  softmax and `probs @ V` in float32). Otherwise (float16, or no C++
  compiler) PyTorch ops over the gathered context: the query heads that
  share a kv head are stacked as rows of one matmul against that head's
  keys (GQA without repeating K/V). Scores and softmax are float32, then
  `probs @ V` runs in the cache dtype with float32 accumulation, as torch's
  CPU SDPA kernel does; a bfloat16 score would be rounded to 8 bits.
- prefill without cached context: SDPA with `is_causal` on the right-padded
  batch (query row i sees keys 0..i, so padding never reaches a real row),
  in the model dtype (float16 in float32: few CPUs multiply it fast).
- the rest (a prefill chunk over cached context): SDPA with a causal mask
  offset by the context length, in float32 (rare; exactness first).

Unused block-table entries may hold any id and unused cache slots NaN, so
the gather never reads them: positions past a sequence's `seq_len` take the
slot of its first token (finite), and the mask or causality gives them
probability 0 (a NaN there would poison `probs @ v` as 0 * NaN).

The grouping and gather indices depend on the step's metadata alone; every
layer calls `forward` with equal metadata, so they are computed once per
step (`_StepMemo`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from platforms.cpu import native
from platforms.cpu.reference import write_kv_nhd
from platforms.interface import AttentionBackend


@dataclass
class _Group:
    """Sequences attended in one padded call.

    `seq_ids [seqs]` int64 rows of the batch; `seq_lens`, `query_lens
    [seqs]` int64, `max_seq_len` / `min_seq_len` the extremes of `seq_lens`;
    `token_ids [seqs, max_query_len]` int64 query rows (0 where a row is
    padding); `used_rows [n]` int64 positions in the flattened
    `[seqs * max_query_len]` padded rows that hold a real token and
    `used_tokens [n]` int64 those tokens' rows of `query`.
    """
    kind: str  # "decode", "prefill" or "chunk"
    seq_ids: torch.Tensor
    seq_lens: torch.Tensor
    query_lens: torch.Tensor
    max_seq_len: int
    min_seq_len: int
    max_query_len: int
    token_ids: torch.Tensor
    used_rows: torch.Tensor
    used_tokens: torch.Tensor


class _StepMemo:
    """The step's groups and gather rows, found again by the metadata's content.

    Comparing a few small int tensors costs microseconds; redoing the index
    arithmetic for each of a model's layers costs far more. A step with
    other metadata replaces everything, so the memo holds one step's worth.
    """

    def __init__(self) -> None:
        self._metadata: tuple[torch.Tensor, ...] = ()
        self._groups: list[_Group] = []
        self._rows: list[tuple[tuple[torch.Tensor, ...], tuple, torch.Tensor]] = []

    def groups(self, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               query_start_loc: torch.Tensor) -> list[_Group]:
        metadata = (block_tables, seq_lens, query_start_loc)
        if not _all_equal(self._metadata, metadata):
            self._metadata = tuple(t.clone() for t in metadata)
            self._groups = _plan_groups(seq_lens, query_start_loc)
            self._rows = []
        return self._groups

    def context_rows(self, block_tables: torch.Tensor, seq_ids: torch.Tensor,
                     seq_lens: torch.Tensor, max_seq_len: int, block_size: int,
                     num_kv_heads: int) -> torch.Tensor:
        """`_context_rows(...)`, computed once per step for each group and cache shape."""
        tensors, scalars = (block_tables, seq_ids, seq_lens), (max_seq_len, block_size,
                                                                num_kv_heads)
        for saved_tensors, saved_scalars, rows in self._rows:
            if saved_scalars == scalars and _all_equal(saved_tensors, tensors):
                return rows
        rows = _context_rows(*tensors, *scalars)
        self._rows.append((tuple(t.clone() for t in tensors), scalars, rows))
        return rows


def _all_equal(saved: tuple, tensors: tuple) -> bool:
    return len(saved) == len(tensors) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        for a, b in zip(saved, tensors))


def _plan_groups(seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> list[_Group]:
    """The step's sequences by kind (see the module docstring); empty queries skipped."""
    starts = query_start_loc.tolist()
    buckets: dict[tuple[str, int], list[int]] = {}
    for seq, seq_len in enumerate(seq_lens.tolist()):
        query_len = starts[seq + 1] - starts[seq]
        if query_len == 1:
            key = ("decode", (seq_len - 1).bit_length())
        elif query_len == seq_len:
            key = ("prefill", 0)
        else:
            key = ("chunk", 0)
        if query_len > 0:
            buckets.setdefault(key, []).append(seq)
    return [_make_group(kind, torch.tensor(seq_ids), seq_lens, query_start_loc)
            for (kind, _), seq_ids in buckets.items()]


def _make_group(kind: str, seq_ids: torch.Tensor, seq_lens: torch.Tensor,
                query_start_loc: torch.Tensor) -> _Group:
    query_starts = query_start_loc[seq_ids].long()
    query_lens = query_start_loc[seq_ids + 1].long() - query_starts
    max_query_len = int(query_lens.max())
    rows = torch.arange(max_query_len)
    row_used = rows < query_lens[:, None]                       # [seqs, max_query_len]
    token_ids = torch.where(row_used, query_starts[:, None] + rows, 0)
    group_seq_lens = seq_lens[seq_ids].long()
    return _Group(kind, seq_ids, group_seq_lens, query_lens, int(group_seq_lens.max()),
                  int(group_seq_lens.min()), max_query_len, token_ids,
                  row_used.flatten().nonzero().flatten(), token_ids[row_used])


def _context_rows(block_tables: torch.Tensor, seq_ids: torch.Tensor, seq_lens: torch.Tensor,
                  max_seq_len: int, block_size: int, num_kv_heads: int) -> torch.Tensor:
    """Rows of `cache.view(-1, head)` to gather, `[seqs * kv_heads * max_seq_len]` int64.

    Ordered (sequence, kv head, position); positions past a sequence's
    `seq_len` point at its first token's slot, which always holds written K/V.
    """
    positions = torch.arange(max_seq_len)
    blocks = block_tables[seq_ids][:, positions // block_size].long()
    slots = blocks * block_size + positions % block_size        # [seqs, max_seq_len]
    slots = torch.where(positions < seq_lens[:, None], slots, slots[:, :1])
    heads = torch.arange(num_kv_heads)
    return (slots[:, None, :] * num_kv_heads + heads[:, None]).flatten()


def _padded_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


class FastCpuBackend(AttentionBackend):
    name = "fast"

    def __init__(self) -> None:
        self._memo = _StepMemo()

    @functools.cached_property
    def _kernels(self) -> Optional[native.CpuKernels]:
        """The compiled kernels, looked up (and built) once, on first use."""
        return native.cpu_kernels()

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        kernels = self._kernels
        if kernels is not None and kernels.can_write(key, value, key_cache, value_cache,
                                                     slot_mapping):
            kernels.write_kv(key, value, key_cache, value_cache, slot_mapping)
        else:
            write_kv_nhd(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        self.write_kv(key, value, key_cache, value_cache, slot_mapping)
        out = torch.empty_like(query)
        for group in self._memo.groups(block_tables, seq_lens, query_start_loc):
            attend = self._decode if group.kind == "decode" else self._attend_padded
            attend(query, key_cache, value_cache, block_tables, group, scale, out)
        return out

    def _decode(self, query, key_cache, value_cache, block_tables, group: _Group,
                scale: float, out: torch.Tensor) -> None:
        """One new token per sequence: `[seqs, kv_heads, group, head] @ K^T`, softmax, `@ V`."""
        kernels = self._kernels
        if kernels is not None and kernels.can_decode(query, key_cache, value_cache,
                                                      block_tables):
            # One token per sequence: used_tokens are the group's query rows, in order.
            kernels.decode(query, key_cache, value_cache, block_tables, group.seq_ids,
                           group.seq_lens, group.used_tokens, scale, out)
            return
        keys = self._gather_context(key_cache, block_tables, group.seq_ids, group.seq_lens,
                                    group.max_seq_len, torch.float32)
        value_dtype = _padded_compute_dtype(value_cache.dtype)
        values = self._gather_context(value_cache, block_tables, group.seq_ids,
                                      group.seq_lens, group.max_seq_len, value_dtype)
        num_seqs, num_kv_heads, context_len, head_size = keys.shape
        tokens = group.token_ids[:, 0]
        q = query[tokens].view(num_seqs, num_kv_heads, -1, head_size).float().mul_(scale)
        scores = torch.matmul(q, keys.transpose(-1, -2))  # [seqs, kv_heads, group, context]
        if context_len > group.min_seq_len:
            past_end = torch.arange(context_len) >= group.seq_lens[:, None]
            scores.masked_fill_(past_end[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(value_dtype)
        attended = torch.matmul(probs, values).view(num_seqs, -1, head_size)
        out.index_copy_(0, tokens, attended.to(out.dtype))

    def _attend_padded(self, query, key_cache, value_cache, block_tables, group: _Group,
                       scale: float, out: torch.Tensor) -> None:
        """SDPA over the group padded to `[seqs, heads, max_query_len, head]` queries.

        Prefill groups (no cached context) use `is_causal`; chunks over a
        context get the mask `[seqs, 1, max_query_len, context]` instead.
        """
        is_prefill = group.kind == "prefill"
        compute_dtype = _padded_compute_dtype(query.dtype) if is_prefill else torch.float32
        q = query[group.token_ids].to(compute_dtype).transpose(1, 2)
        k, v = (self._gather_context(cache, block_tables, group.seq_ids, group.seq_lens,
                                     group.max_seq_len, compute_dtype)
                for cache in (key_cache, value_cache))
        mask = None
        if not is_prefill:
            query_pos = ((group.seq_lens - group.query_lens)[:, None]
                         + torch.arange(group.max_query_len))
            mask = (torch.arange(k.shape[2]) <= query_pos[:, :, None]).unsqueeze(1)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_prefill, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1])
        attended = attended.transpose(1, 2).flatten(0, 1)[group.used_rows]
        out.index_copy_(0, group.used_tokens, attended.to(out.dtype))

    def _gather_context(self, cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_ids: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                        compute_dtype: torch.dtype) -> torch.Tensor:
        """Each sequence's first `seq_len` cached tokens, finite copies past them.

        `cache [num_blocks, block_size, kv_heads, head]` ->
        `[seqs, kv_heads, max_seq_len, head]` in `compute_dtype`.
        """
        _, block_size, num_kv_heads, head_size = cache.shape
        rows = self._memo.context_rows(block_tables, seq_ids, seq_lens, max_seq_len,
                                       block_size, num_kv_heads)
        context = cache.view(-1, head_size).index_select(0, rows)
        return context.view(len(seq_ids), num_kv_heads, max_seq_len, head_size).to(compute_dtype)
