"""PagedAttention through intel-extension-for-pytorch (IPEX) kernels.

Uses `intel_extension_for_pytorch.llm.modules.PagedAttention`, which runs on
XPU tensors on an Intel GPU and on CPU tensors elsewhere:
`reshape_and_cache` stores the new K/V, `single_query_cached_kv_attention`
serves batches where every sequence decodes one token, and
`flash_attn_varlen_func` (causal, aligned to each sequence's last key)
serves every other batch: prefills, chunked prefills and mixed ones.

KV cache layout (measured; the IPEX docstring says otherwise):
`[num_blocks, num_kv_heads, block_size, head_size]`.

IPEX 2.8 imports only beside torch 2.8, so outside an Intel GPU image this
backend runs in its own venv (`ci/xpu_venv.py`).
"""

from __future__ import annotations

from typing import Optional

import torch

from platforms.interface import AttentionBackend
from platforms.xpu import require


def _paged_attention_ops():
    modules = require("intel_extension_for_pytorch.llm.modules",
                      "pip install intel-extension-for-pytorch==2.8.0 beside torch==2.8.0")
    return modules.PagedAttention


class IpexBackend(AttentionBackend):
    name = "ipex"

    def __init__(self) -> None:
        self._ops = None
        self._head_mappings: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    @property
    def ops(self):
        """IPEX's PagedAttention class, imported on first use."""
        if self._ops is None:
            self._ops = _paged_attention_ops()
        return self._ops

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, head_size)

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        # IPEX's CPU kernel writes slot -1 out of bounds (heap corruption), so
        # skipped tokens are dropped here rather than passed through.
        keep = slot_mapping >= 0
        self.ops.reshape_and_cache(key[keep], value[keep], key_cache, value_cache,
                                   slot_mapping[keep])

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        _check_cache(key_cache, key, "key_cache")
        _check_cache(value_cache, value, "value_cache")
        self.write_kv(key, value, key_cache, value_cache, slot_mapping)
        if max_query_len is None:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        out = torch.empty_like(query)
        if max_query_len == 1 and query.shape[0] == seq_lens.shape[0]:
            self._decode(out, query, key_cache, value_cache, block_tables, seq_lens,
                         scale, max_seq_len)
        else:
            cu_seqlens_kv = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
            self.ops.flash_attn_varlen_func(
                out, query, key_cache, value_cache, query_start_loc, cu_seqlens_kv,
                max_query_len, max_seq_len, scale, True, block_tables, None)
        return out

    def _decode(self, out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                max_seq_len) -> None:
        """One new token per sequence: query row i belongs to sequence i."""
        head_mapping = self._head_mapping(query.shape[1], key_cache.shape[1], query.device)
        self.ops.single_query_cached_kv_attention(
            out, query, key_cache, value_cache, head_mapping, scale, block_tables,
            seq_lens, key_cache.shape[2], max_seq_len, None)

    def _head_mapping(self, num_heads: int, num_kv_heads: int,
                      device: torch.device) -> torch.Tensor:
        """[num_heads] int32: the KV head each query head reads (GQA)."""
        key = (num_heads, num_kv_heads, device)
        if key not in self._head_mappings:
            group = num_heads // num_kv_heads
            self._head_mappings[key] = torch.arange(
                num_kv_heads, dtype=torch.int32, device=device).repeat_interleave(group)
        return self._head_mappings[key]


def _check_cache(cache: torch.Tensor, new: torch.Tensor, field: str) -> None:
    """`cache` must be `[num_blocks, num_kv_heads, block_size, head_size]` for `new`."""
    num_kv_heads, head_size = new.shape[1], new.shape[2]
    if cache.dim() != 4 or cache.shape[1] != num_kv_heads or cache.shape[3] != head_size:
        raise ValueError(f"{field} has shape {tuple(cache.shape)}; the ipex backend expects "
                         f"[num_blocks, {num_kv_heads}, block_size, {head_size}]")
