"""Unified PagedAttention in Triton: prefill, chunked prefill and decode in one launch.

Layouts (the platform contract): `query [num_tokens, num_heads, head_size]`
packed over sequences; `key_cache / value_cache [num_blocks, block_size,
num_kv_heads, head_size]` (NHD); `block_tables [num_seqs, max_blocks]`,
`seq_lens [num_seqs]`, `query_start_loc [num_seqs + 1]`, int32 (int64 works
too: Triton compiles a variant per pointer type).

Grid: (query tiles, kv heads, kv splits). A query tile is `block_q` tokens of
one sequence times the `group` query heads sharing a KV head, flattened into
`block_m` rows (row r = token r // group, head r % group), so each K/V byte is
read once per group. Sequence s owns the tile ids
[first_tile(s), first_tile(s + 1)) with
first_tile(s) = (query_start_loc[s] + s * (block_q - 1)) // block_q, which
leaves room for ceil(q_len / block_q) tiles and is exact for decode
(block_q = 1), so the grid size needs no device sync.

Softmax is online, in fp32, in base 2 (scale pre-multiplied by log2(e)).
Keys at or beyond a tile's last needed position are never loaded: cache pages
past seq_len may hold anything (NaN included), and block table entries past
the sequence's last page are not read either.

With kv splits > 1 (decode of long contexts), split k covers a contiguous run
of key tiles and writes its normalised partial output and log2-sum-exp to
fp32 buffers; `split_kv.combine_splits` reduces them.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from platforms.rocm.split_kv import combine_splits
from platforms.rocm.tuning import KernelConfig

#: a finite "minus infinity" for the running max, so a row that has seen only
#: masked keys gives exp2(-inf - this) = 0 rather than NaN
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile_id, BLOCK_Q: tl.constexpr):
    """The sequence whose tile range holds `tile_id` (binary search)."""
    lo = tile_id * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = (tl.load(query_start_loc_ptr + mid) + mid * (BLOCK_Q - 1)) // BLOCK_Q
        lo = tl.where(first <= tile_id, mid, lo)
        hi = tl.where(first <= tile_id, hi, mid - 1)
    return lo


@triton.jit
def _load_kv_tile(cache_ptr, block_table_ptr, key_pos, key_valid, dims, dim_valid, kv_head,
                  stride_block, stride_slot, stride_head, BLOCK_SIZE: tl.constexpr):
    """Gather cache rows `[TILE_N, HEAD_PAD]` for `key_pos` through the block table."""
    page = tl.load(block_table_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
    row = page.to(tl.int64) * stride_block + (key_pos % BLOCK_SIZE) * stride_slot
    ptrs = cache_ptr + (row + kv_head * stride_head)[:, None] + dims[None, :]
    return tl.load(ptrs, mask=key_valid[:, None] & dim_valid[None, :], other=0.0)


@triton.jit
def _attend_tiles(q, key_cache_ptr, value_cache_ptr, block_table_ptr, row_pos, dims, dim_valid,
                  kv_head, kv_len, tile_lo, tile_hi, scale_log2,
                  stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
                  BLOCK_M: tl.constexpr, HEAD_PAD: tl.constexpr, TILE_N: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Online softmax over key tiles [tile_lo, tile_hi); returns (max, sum, acc) in fp32."""
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_N + tl.arange(0, TILE_N)
        key_valid = key_pos < kv_len
        k = _load_kv_tile(key_cache_ptr, block_table_ptr, key_pos, key_valid, dims, dim_valid,
                          kv_head, stride_kc_b, stride_kc_s, stride_kc_h, BLOCK_SIZE)
        v = _load_kv_tile(value_cache_ptr, block_table_ptr, key_pos, key_valid, dims, dim_valid,
                          kv_head, stride_vc_b, stride_vc_s, stride_vc_h, BLOCK_SIZE)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        scores = tl.where(key_pos[None, :] <= row_pos[:, None], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, acc


# Sequence and token counts change every step: specializing on them (== 1, divisible by 16)
# would compile new variants in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def paged_attention_kernel(
        out_ptr, partial_out_ptr, partial_lse_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
        block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, scale_log2, num_seqs, num_tokens,
        stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_bt_s,
        stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
        HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, UPCAST_DOT: tl.constexpr, PARTIAL: tl.constexpr):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile_id, BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    q_first = (tile_id - (q_begin + seq * (BLOCK_Q - 1)) // BLOCK_Q) * BLOCK_Q
    if q_first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    row_q = q_first + rows // GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (row_q < q_len)
    row_pos = context_len + row_q
    token = (q_begin + row_q).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    io_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(query_ptr + (token * stride_q_t + head * stride_q_h)[:, None] + dims[None, :],
                mask=io_mask, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    kv_len = tl.minimum(seq_len, context_len + q_first + BLOCK_Q)
    num_tiles = tl.cdiv(kv_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, tl.num_programs(2))
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    m_i, l_i, acc = _attend_tiles(
        q, key_cache_ptr, value_cache_ptr, block_tables_ptr + seq.to(tl.int64) * stride_bt_s,
        row_pos, dims, dim_valid, kv_head, kv_len, tile_lo, tile_hi, scale_log2,
        stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
        BLOCK_M, HEAD_PAD, TILE_N, BLOCK_SIZE, UPCAST_DOT)

    # A split may hold no key a row can see (l = 0): it then contributes
    # nothing to the combine (lse = -inf) instead of 0 / 0.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    if PARTIAL:
        num_heads = tl.num_programs(1) * GROUP
        part_row = (split * num_tokens + token) * num_heads + head
        tl.store(partial_lse_ptr + part_row, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")),
                 mask=row_valid)
        tl.store(partial_out_ptr + part_row[:, None] * HEAD_SIZE + dims[None, :], out,
                 mask=io_mask)
    else:
        tl.store(out_ptr + (token * stride_o_t + head * stride_o_h)[:, None] + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_query_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Grid size over query tiles (see the module docstring)."""
    return (num_tokens + num_seqs * (block_q - 1)) // block_q


def attention_constexprs(dtype: torch.dtype, head_size: int, group: int, block_size: int,
                         config: KernelConfig, partial: bool) -> dict:
    """The compile-time arguments of `paged_attention_kernel` for one launch shape."""
    return dict(
        HEAD_SIZE=head_size, HEAD_PAD=max(16, triton.next_power_of_2(head_size)), GROUP=group,
        BLOCK_M=config.block_m, BLOCK_Q=config.block_q, TILE_N=config.tile_n,
        BLOCK_SIZE=block_size,
        # the interpreter multiplies bf16 dot operands as raw 16-bit integers
        UPCAST_DOT=interpreting() and dtype == torch.bfloat16,
        PARTIAL=partial)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, config: KernelConfig,
                    num_splits: int = 1) -> torch.Tensor:
    """Attend every packed query token to its sequence's cached keys.

    The new tokens' K/V must already be in the cache. `num_splits > 1` splits
    each sequence's keys over that many programs (decode of long contexts).
    Returns `out [num_tokens, num_heads, head_size]` in `query.dtype`.
    """
    num_tokens, num_heads, head_size = query.shape
    num_seqs, num_kv_heads = seq_lens.shape[0], key_cache.shape[2]
    out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    partial_out = partial_lse = out
    if num_splits > 1:
        partial_out = torch.empty((num_splits, num_tokens, num_heads, head_size),
                                  dtype=torch.float32, device=query.device)
        partial_lse = torch.empty((num_splits, num_tokens, num_heads),
                                  dtype=torch.float32, device=query.device)
    grid = (num_query_tiles(num_tokens, num_seqs, config.block_q), num_kv_heads, num_splits)
    constexprs = attention_constexprs(query.dtype, head_size, num_heads // num_kv_heads,
                                      key_cache.shape[1], config, num_splits > 1)
    paged_attention_kernel[grid](
        out, partial_out, partial_lse, query, key_cache, value_cache,
        block_tables, seq_lens, query_start_loc, scale * math.log2(math.e), num_seqs, num_tokens,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *key_cache.stride()[:3], *value_cache.stride()[:3],
        **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)
    if num_splits > 1:
        combine_splits(partial_out, partial_lse, out)
    return out
