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
from platforms.rocm.write_kv import write_kv


def _check_inputs(query, key, value, key_cache, value_cache, slot_mapping, block_tables,
                  seq_lens, query_start_loc, dtypes) -> None:
    """Raise ValueError naming the first field that breaks the contract."""
    if query.dim() != 3:
        raise ValueError("query must be [num_tokens, num_heads, head_size], "
                         f"got {tuple(query.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache / value_cache must both be [num_blocks, block_size, "
                         f"num_kv_heads, head_size], got {tuple(key_cache.shape)} and "
                         f"{tuple(value_cache.shape)}")
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_size:
        raise ValueError(f"key_cache head_size {key_cache.shape[3]} != query head_size "
                         f"{head_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query num_heads {num_heads} is not a multiple of key_cache "
                         f"num_kv_heads {num_kv_heads}")
    for field, tensor in (("key", key), ("value", value)):
        if tuple(tensor.shape) != (num_tokens, num_kv_heads, head_size):
            raise ValueError(f"{field} must be {(num_tokens, num_kv_heads, head_size)}, "
                             f"got {tuple(tensor.shape)}")
    if query.dtype not in dtypes or key_cache.dtype != query.dtype:
        raise ValueError(f"query dtype {query.dtype} and key_cache dtype {key_cache.dtype} must "
                         f"match and be one of {list(dtypes)}")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query, key_cache and value_cache need a contiguous head_size dimension")
    num_seqs = seq_lens.shape[0]
    if tuple(slot_mapping.shape) != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if tuple(query_start_loc.shape) != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [{num_seqs + 1}], "
                         f"got {tuple(query_start_loc.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        write_kv(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        _check_inputs(query, key, value, key_cache, value_cache, slot_mapping, block_tables,
                      seq_lens, query_start_loc, self.supported_dtypes)
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
