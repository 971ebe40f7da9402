"""The "triton" attention backend: the Triton kernels behind the platform contract.

Runs wherever Triton does: compiled on AMD (HIP) and NVIDIA (CUDA) GPUs, and
in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1) for tests.
Layouts are the contract's (platforms/interface.py); the KV cache is NHD.
"""

from __future__ import annotations

from typing import Optional

import torch

from platforms.interface import AttentionBackend
from platforms.rocm import tuning
from platforms.rocm.triton_attention import paged_attention
from platforms.rocm.validation import check_forward_inputs
from platforms.rocm.write_kv import write_kv


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        write_kv(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        check_forward_inputs(query, key, value, key_cache, value_cache, slot_mapping,
                             block_tables, seq_lens, query_start_loc, scale,
                             self.supported_dtypes)
        self.write_kv(key, value, key_cache, value_cache, slot_mapping)
        return self.attend(query, key_cache, value_cache, block_tables, seq_lens,
                           query_start_loc, scale, max_seq_len, max_query_len)

    def attend(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               block_tables: torch.Tensor, seq_lens: torch.Tensor,
               query_start_loc: torch.Tensor, scale: float,
               max_seq_len: Optional[int] = None,
               max_query_len: Optional[int] = None) -> torch.Tensor:
        """`forward` without the K/V write: the new tokens must already be cached.

        Picks the launch shape for this target and, for decode, the KV splits.
        """
        if query.shape[0] == 0 or seq_lens.shape[0] == 0:
            return torch.empty_like(query)
        if max_query_len is None:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_kv_heads, head_size = key_cache.shape[2], key_cache.shape[3]
        config = tuning.attention_config(tuning.target_backend(), head_size,
                                         query.shape[1] // num_kv_heads, max_query_len,
                                         key_cache.element_size())
        num_splits = tuning.num_kv_splits(seq_lens.shape[0], num_kv_heads, max_seq_len,
                                          max_query_len, tuning.compute_units(query.device))
        return paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                               query_start_loc, scale, config, num_splits)
