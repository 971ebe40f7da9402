"""The oracle: plain PyTorch PagedAttention, one sequence at a time.

Gathers each sequence's blocks through its block table, computes in float32
(float64 when asked) and casts back. Every other kernel is checked against it,
so it is kept short and obviously correct rather than fast.
"""

from __future__ import annotations

from typing import Optional

import torch

from platforms.interface import AttentionBackend


def write_kv_nhd(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter K/V into an NHD cache `[num_blocks, block_size, kv_heads, head]`."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep].to(value_cache.dtype)


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def __init__(self, compute_dtype: torch.dtype = torch.float32):
        self.compute_dtype = compute_dtype

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        write_kv_nhd(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        self.write_kv(key, value, key_cache, value_cache, slot_mapping)
        out = torch.empty_like(query)
        block_size = key_cache.shape[1]
        num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
        group = num_heads // num_kv_heads
        for i in range(len(seq_lens)):
            q_start, q_end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            q_len, seq_len = q_end - q_start, int(seq_lens[i])
            if q_len == 0:
                continue
            num_blocks = (seq_len + block_size - 1) // block_size
            blocks = block_tables[i, :num_blocks].long()
            k = key_cache[blocks].flatten(0, 1)[:seq_len].to(self.compute_dtype)
            v = value_cache[blocks].flatten(0, 1)[:seq_len].to(self.compute_dtype)
            k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head]
            v = v.repeat_interleave(group, dim=1)
            q = query[q_start:q_end].to(self.compute_dtype)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale
            q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
            k_pos = torch.arange(seq_len).unsqueeze(0)
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
        return out
