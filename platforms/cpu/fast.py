"""The CPU default: PagedAttention vectorized over the batch with torch SDPA.

Sequences are padded into one batch: queries to `[seqs, max_query_len]` and
each block table's used blocks gathered into `[seqs, max_seq_len]` keys, so
one SDPA call serves every sequence. Decode sequences (one query token) are
attended separately from the rest when a batch mixes both, so a long prefill
chunk does not pad every decode row to its length.

Unused block-table entries may hold any id and unused cache slots may hold
NaN, so gathered blocks past a sequence's used ones are redirected to block 0
and every gathered position past `seq_len` is zeroed, not only masked (a
masked NaN still poisons `probs @ v` as 0 * NaN).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from platforms.cpu.reference import write_kv_nhd
from platforms.interface import AttentionBackend


class FastCpuBackend(AttentionBackend):
    name = "fast"

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        write_kv_nhd(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        self.write_kv(key, value, key_cache, value_cache, slot_mapping)
        out = torch.empty_like(query)
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        if max_query_len is None:
            max_query_len = int(query_lens.max()) if len(query_lens) else 0
        if max_query_len == 0:
            return out
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        is_decode = query_lens == 1
        if max_query_len == 1 or not bool(is_decode.any()):
            groups = [(torch.arange(len(seq_lens), device=query.device), max_query_len)]
        else:
            groups = [(is_decode.nonzero().flatten(), 1),
                      ((~is_decode).nonzero().flatten(), max_query_len)]
        for seq_ids, group_query_len in groups:
            self._attend(query, key_cache, value_cache, block_tables, seq_lens,
                         query_start_loc, seq_ids, group_query_len, max_seq_len, scale, out)
        return out

    def _attend(self, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                seq_ids, max_query_len, max_seq_len, scale, out) -> None:
        """Attend the sequences `seq_ids` in one padded SDPA call, into `out`.

        Padded layouts: queries `[seqs, heads, max_query_len, head]`, keys and
        values `[seqs, kv_heads, num_blocks * block_size, head]`, mask
        `[seqs, 1, max_query_len, num_blocks * block_size]`.
        """
        compute_dtype = torch.float32
        seq_lens = seq_lens[seq_ids].long()
        query_starts = query_start_loc[seq_ids].long()
        query_lens = query_start_loc[seq_ids + 1].long() - query_starts
        rows = torch.arange(max_query_len, device=query.device)
        row_used = rows < query_lens[:, None]                       # [seqs, max_query_len]
        token_ids = torch.where(row_used, query_starts[:, None] + rows, 0)
        q = query[token_ids].to(compute_dtype).transpose(1, 2)
        k = self._gather_context(key_cache, block_tables, seq_ids, seq_lens, max_seq_len,
                                 compute_dtype)
        v = self._gather_context(value_cache, block_tables, seq_ids, seq_lens, max_seq_len,
                                 compute_dtype)
        query_pos = (seq_lens - query_lens)[:, None] + rows          # [seqs, max_query_len]
        key_pos = torch.arange(k.shape[2], device=query.device)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        out[token_ids[row_used]] = attended.transpose(1, 2)[row_used].to(out.dtype)

    @staticmethod
    def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_ids: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                        compute_dtype: torch.dtype) -> torch.Tensor:
        """Gather each sequence's first `seq_len` cached tokens, zero past them.

        `cache [num_blocks, block_size, kv_heads, head]` ->
        `[seqs, kv_heads, num_blocks_needed * block_size, head]`.
        """
        block_size = cache.shape[1]
        num_blocks = (max_seq_len + block_size - 1) // block_size
        used_blocks = (seq_lens + block_size - 1) // block_size
        block_used = torch.arange(num_blocks, device=cache.device) < used_blocks[:, None]
        block_ids = torch.where(block_used, block_tables[seq_ids, :num_blocks].long(), 0)
        tokens = cache[block_ids].flatten(1, 2).to(compute_dtype)   # [seqs, tokens, kv, head]
        positions = torch.arange(tokens.shape[1], device=cache.device)
        token_used = (positions[None, :] < seq_lens[:, None])[:, :, None, None]
        return torch.where(token_used, tokens, 0.0).transpose(1, 2)
