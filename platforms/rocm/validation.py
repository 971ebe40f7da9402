"""Input checks of the Triton backend: a ValueError naming the field, before any launch.

The kernels index every tensor through its strides except the innermost
dimension, and read integer index tensors of either width, so these checks
ask for exactly that: the contract's shapes, one dtype for query and caches,
integer index tensors, a unit innermost stride, and one device for all.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def check_forward_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_cache: torch.Tensor, value_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                         dtypes: Sequence[torch.dtype]) -> None:
    """Raise ValueError naming the first field that breaks the contract."""
    _check_shapes(query, key, value, key_cache, value_cache, slot_mapping, block_tables,
                  seq_lens, query_start_loc)
    if query.dtype not in dtypes or key_cache.dtype != query.dtype:
        raise ValueError(f"query dtype {query.dtype} and key_cache dtype {key_cache.dtype} "
                         f"must match and be one of {list(dtypes)}")
    tensors = {"query": query, "key": key, "value": value, "key_cache": key_cache,
               "value_cache": value_cache, "slot_mapping": slot_mapping,
               "block_tables": block_tables, "seq_lens": seq_lens,
               "query_start_loc": query_start_loc}
    for field, tensor in tensors.items():
        if tensor.device != query.device:
            raise ValueError(f"{field} is on {tensor.device}, query on {query.device}")
        if tensor.numel() and tensor.stride(-1) != 1:
            raise ValueError(f"{field} needs a unit stride in its last dimension, "
                             f"got strides {tensor.stride()}")
    for field in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        if tensors[field].dtype not in _INDEX_DTYPES:
            raise ValueError(f"{field} must be int32 or int64, got {tensors[field].dtype}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def _check_shapes(query, key, value, key_cache, value_cache, slot_mapping, block_tables,
                  seq_lens, query_start_loc) -> None:
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
    if seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be [num_seqs], got {tuple(seq_lens.shape)}")
    num_seqs = seq_lens.shape[0]
    if tuple(slot_mapping.shape) != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if tuple(query_start_loc.shape) != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [{num_seqs + 1}], "
                         f"got {tuple(query_start_loc.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
