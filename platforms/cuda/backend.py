"""The CUDA PagedAttention backend: validation, routing and split-K planning.

Cache layout NHD `[num_blocks, block_size, num_kv_heads, head_size]` (the
contract's default). One `forward` serves decode, prefill and chunked prefill:

- every sequence has at most one new token (decode): `decode`, one CTA per
  (token, KV head group, context partition), tensor cores for fp16/bf16 on
  sm80+, then a combine pass when the context is split;
- otherwise, fp16/bf16 on sm80+: `prefill`, FlashAttention-2-style tiles;
- otherwise (fp32, pre-sm80 GPUs): `decode` run per query token on CUDA cores.

The extension is built on the first kernel call (platforms/cuda/build.py);
creating the backend needs neither a GPU nor nvcc.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from platforms.cuda.build import load_extension
from platforms.interface import AttentionBackend

SUPPORTED_HEAD_SIZES = (64, 80, 96, 128, 256)
# Split-K planning: aim for this many CTAs per SM so the last wave is a small
# fraction of the work, without cutting a context into partitions shorter than
# MIN_PARTITION keys (each split costs a partial write and a combine read).
TARGET_CTAS_PER_SM = 16
MIN_PARTITION = 256
PARTITION_ALIGN = 64  # 4 warps x 16-token tiles
MAX_GRID_Y = 65535


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def split_plan(num_tokens: int, ctas_per_token: int, max_context: int,
               num_sms: int) -> tuple[int, int]:
    """(partition_size, num_splits) for the decode grid."""
    ctas = max(1, num_tokens * ctas_per_token)
    wanted = math.ceil(TARGET_CTAS_PER_SM * num_sms / ctas)
    splits = max(1, min(wanted, math.ceil(max_context / MIN_PARTITION)))
    partition = math.ceil(math.ceil(max_context / splits) / PARTITION_ALIGN) * PARTITION_ALIGN
    return partition, math.ceil(max_context / partition)


def vector_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when the kernels can read it in 16-byte vectors, else a copy."""
    elems = 16 // t.element_size()
    aligned = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s % elems == 0 for s in t.stride()[:-1]))
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")


def _check_index(t: torch.Tensor, field: str, dtype: torch.dtype, dim: int,
                 device: torch.device) -> None:
    _require(t.dtype == dtype, field, f"must be {dtype}, got {t.dtype}")
    _require(t.dim() == dim, field, f"must be {dim}-D, got shape {tuple(t.shape)}")
    _require(t.device == device, field, f"must be on {device}, got {t.device}")


class CudaAttentionBackend(AttentionBackend):
    name = "cuda"
    supported_head_sizes = SUPPORTED_HEAD_SIZES

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        self._check_cache(key_cache, value_cache, key_cache.dtype)
        self._check_new_kv(key, value, key_cache, slot_mapping)
        load_extension().write_kv(vector_ready(key.to(key_cache.dtype)),
                                  vector_ready(value.to(value_cache.dtype)),
                                  key_cache, value_cache, slot_mapping)

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        self._check_query(query)
        self._check_cache(key_cache, value_cache, query.dtype)
        _require(key_cache.shape[3] == query.shape[2], "key_cache",
                 f"head_size {key_cache.shape[3]} != query head_size {query.shape[2]}")
        _require(query.shape[1] % key_cache.shape[2] == 0, "query",
                 f"num_heads {query.shape[1]} is not a multiple of num_kv_heads "
                 f"{key_cache.shape[2]}")
        self._check_metadata(block_tables, seq_lens, query_start_loc, query.device)
        _require(math.isfinite(float(scale)), "scale", f"must be finite, got {scale}")
        self.write_kv(key, value, key_cache, value_cache, slot_mapping)

        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        num_seqs = seq_lens.shape[0]
        if query.shape[0] == 0 or num_seqs == 0:
            return out
        if max_query_len is None:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        args = (out, vector_ready(query), key_cache, value_cache, block_tables, seq_lens,
                query_start_loc, float(scale))
        index = query.device.index
        capability, num_sms = _device_info(torch.cuda.current_device() if index is None else index)
        tensor_cores = query.dtype != torch.float32 and capability >= (8, 0)
        ext = load_extension()
        if max_query_len > 1 and tensor_cores:
            _require(num_seqs <= MAX_GRID_Y, "seq_lens",
                     f"at most {MAX_GRID_Y} sequences per call, got {num_seqs}")
            ext.prefill(*args, max_query_len)
            return out
        group = query.shape[1] // key_cache.shape[2]
        heads_per_cta = 16 if tensor_cores else 8
        ctas_per_token = key_cache.shape[2] * math.ceil(group / heads_per_cta)
        _require(ctas_per_token <= MAX_GRID_Y, "key_cache", "too many KV heads for one grid")
        partition, splits = split_plan(query.shape[0], ctas_per_token, max_seq_len, num_sms)
        tokens_are_seqs = query.shape[0] == num_seqs and max_query_len == 1
        ext.decode(*args, partition, splits, tokens_are_seqs, tensor_cores)
        return out

    # -- validation (ValueError naming the field) ---------------------------

    def _check_query(self, query: torch.Tensor) -> None:
        _require(query.dim() == 3, "query",
                 f"must be [num_tokens, num_heads, head_size], got {tuple(query.shape)}")
        _require(query.dtype in self.supported_dtypes, "query",
                 f"dtype {query.dtype} not supported; use one of {list(self.supported_dtypes)}")
        _require(query.shape[2] in SUPPORTED_HEAD_SIZES, "query",
                 f"head_size {query.shape[2]} not supported; use one of {SUPPORTED_HEAD_SIZES}")
        _require(query.device.type == "cuda", "query", f"must be on a CUDA device, got {query.device}")

    def _check_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     dtype: torch.dtype) -> None:
        for field, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            _require(cache.dim() == 4, field, "must be [num_blocks, block_size, num_kv_heads, "
                     f"head_size], got {tuple(cache.shape)}")
            _require(cache.dtype == dtype, field, f"dtype {cache.dtype} != {dtype}")
            _require(cache.is_contiguous(), field, "must be contiguous")
            _require(cache.device.type == "cuda", field, f"must be on a CUDA device, got {cache.device}")
        _require(value_cache.shape == key_cache.shape, "value_cache",
                 f"shape {tuple(value_cache.shape)} != key_cache {tuple(key_cache.shape)}")
        _require(value_cache.device == key_cache.device, "value_cache", "not on key_cache's device")
        _require(key_cache.shape[3] in SUPPORTED_HEAD_SIZES, "key_cache",
                 f"head_size {key_cache.shape[3]} not supported; use one of {SUPPORTED_HEAD_SIZES}")

    def _check_new_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
        row = tuple(key_cache.shape[2:])
        for field, t in (("key", key), ("value", value)):
            _require(t.dim() == 3 and tuple(t.shape[1:]) == row, field,
                     f"must be [num_tokens, {row[0]}, {row[1]}], got {tuple(t.shape)}")
            _require(t.device == key_cache.device, field, f"must be on {key_cache.device}")
        _require(value.shape[0] == key.shape[0], "value", "num_tokens differs from key")
        _check_index(slot_mapping, "slot_mapping", torch.int64, 1, key_cache.device)
        _require(slot_mapping.shape[0] == key.shape[0], "slot_mapping",
                 f"length {slot_mapping.shape[0]} != num_tokens {key.shape[0]}")

    def _check_metadata(self, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, device: torch.device) -> None:
        _check_index(block_tables, "block_tables", torch.int32, 2, device)
        _check_index(seq_lens, "seq_lens", torch.int32, 1, device)
        _check_index(query_start_loc, "query_start_loc", torch.int32, 1, device)
        _require(block_tables.shape[0] == seq_lens.shape[0], "block_tables",
                 f"{block_tables.shape[0]} rows for {seq_lens.shape[0]} sequences")
        _require(block_tables.stride(1) == 1, "block_tables", "rows must be contiguous")
        _require(query_start_loc.shape[0] == seq_lens.shape[0] + 1, "query_start_loc",
                 f"length {query_start_loc.shape[0]} != num_seqs + 1 ({seq_lens.shape[0] + 1})")
        _require(seq_lens.is_contiguous(), "seq_lens", "must be contiguous")
        _require(query_start_loc.is_contiguous(), "query_start_loc", "must be contiguous")
