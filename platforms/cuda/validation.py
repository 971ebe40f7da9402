"""Input checks of the CUDA backend: a ValueError naming the field, before any launch.

Runs on every `forward` (per layer per step), so messages are only formatted
when a check fails.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

SUPPORTED_HEAD_SIZES = (64, 80, 96, 128, 256)


def fail(field: str, message: str) -> None:
    raise ValueError(f"{field}: {message}")


def check_query(query: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """query [num_tokens, num_heads, head_size] on a CUDA device."""
    if query.dim() != 3:
        fail("query", f"must be [num_tokens, num_heads, head_size], got {tuple(query.shape)}")
    if query.dtype not in dtypes:
        fail("query", f"dtype {query.dtype} not supported; use one of {list(dtypes)}")
    if query.shape[2] not in SUPPORTED_HEAD_SIZES:
        fail("query", f"head_size {query.shape[2]} not supported; use one of "
                      f"{SUPPORTED_HEAD_SIZES}")
    if query.device.type != "cuda":
        fail("query", f"must be on a CUDA device, got {query.device}")


def check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor,
                 dtype: torch.dtype) -> None:
    """Two contiguous NHD caches [num_blocks, block_size, num_kv_heads, head_size]."""
    for field, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() != 4:
            fail(field, "must be [num_blocks, block_size, num_kv_heads, head_size], got "
                        f"{tuple(cache.shape)}")
        if cache.dtype != dtype:
            fail(field, f"dtype {cache.dtype} != {dtype}")
        if not cache.is_contiguous():
            fail(field, "must be contiguous")
        if cache.device.type != "cuda":
            fail(field, f"must be on a CUDA device, got {cache.device}")
    if value_cache.shape != key_cache.shape:
        fail("value_cache", f"shape {tuple(value_cache.shape)} != key_cache "
                            f"{tuple(key_cache.shape)}")
    if value_cache.device != key_cache.device:
        fail("value_cache", f"on {value_cache.device}, key_cache on {key_cache.device}")
    if key_cache.shape[3] not in SUPPORTED_HEAD_SIZES:
        fail("key_cache", f"head_size {key_cache.shape[3]} not supported; use one of "
                          f"{SUPPORTED_HEAD_SIZES}")


def check_query_matches_cache(query: torch.Tensor, key_cache: torch.Tensor) -> None:
    if key_cache.shape[3] != query.shape[2]:
        fail("key_cache", f"head_size {key_cache.shape[3]} != query head_size {query.shape[2]}")
    if query.shape[1] % key_cache.shape[2]:
        fail("query", f"num_heads {query.shape[1]} is not a multiple of num_kv_heads "
                      f"{key_cache.shape[2]}")
    if query.device != key_cache.device:
        fail("query", f"on {query.device}, key_cache on {key_cache.device}")


def check_new_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """key/value [num_tokens, num_kv_heads, head_size] and slot_mapping [num_tokens] int64."""
    row = key_cache.shape[2:]
    for field, t in (("key", key), ("value", value)):
        if t.dim() != 3 or t.shape[1:] != row:
            fail(field, f"must be [num_tokens, {row[0]}, {row[1]}], got {tuple(t.shape)}")
        if t.device != key_cache.device:
            fail(field, f"on {t.device}, key_cache on {key_cache.device}")
    if value.shape[0] != key.shape[0]:
        fail("value", f"{value.shape[0]} tokens, key has {key.shape[0]}")
    check_index(slot_mapping, "slot_mapping", torch.int64, 1, key_cache.device)
    if slot_mapping.shape[0] != key.shape[0]:
        fail("slot_mapping", f"length {slot_mapping.shape[0]} != num_tokens {key.shape[0]}")


def check_metadata(block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, device: torch.device) -> None:
    """block_tables [num_seqs, max_blocks], seq_lens [num_seqs], query_start_loc [num_seqs + 1]."""
    check_index(block_tables, "block_tables", torch.int32, 2, device)
    check_index(seq_lens, "seq_lens", torch.int32, 1, device)
    check_index(query_start_loc, "query_start_loc", torch.int32, 1, device)
    if block_tables.shape[0] != seq_lens.shape[0]:
        fail("block_tables", f"{block_tables.shape[0]} rows for {seq_lens.shape[0]} sequences")
    if block_tables.stride(1) != 1:
        fail("block_tables", "rows must be contiguous")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        fail("query_start_loc", f"length {query_start_loc.shape[0]} != num_seqs + 1 "
                                f"({seq_lens.shape[0] + 1})")
    if not seq_lens.is_contiguous():
        fail("seq_lens", "must be contiguous")
    if not query_start_loc.is_contiguous():
        fail("query_start_loc", "must be contiguous")


def check_index(t: torch.Tensor, field: str, dtype: torch.dtype, dim: int,
                device: torch.device) -> None:
    if t.dtype != dtype:
        fail(field, f"must be {dtype}, got {t.dtype}")
    if t.dim() != dim:
        fail(field, f"must be {dim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        fail(field, f"must be on {device}, got {t.device}")


def check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        fail("scale", f"must be finite, got {scale}")
