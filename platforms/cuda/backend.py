"""The CUDA PagedAttention backend: routing and split-K planning.

Cache layout NHD `[num_blocks, block_size, num_kv_heads, head_size]` (the
contract's default). One `forward` serves decode, prefill and chunked prefill:

- every sequence has at most one new token (decode): `decode`, one CTA per
  (token, KV head group, context partition), tensor cores for fp16/bf16 on
  sm80+, then a combine pass when the context is split;
- otherwise, fp16/bf16 on sm80+: `prefill`, FlashAttention-2-style tiles;
- otherwise (fp32, pre-sm80 GPUs): `decode` run per query token on CUDA cores.

The extension is built on the first kernel call (platforms/cuda/build.py);
creating the backend needs neither a GPU nor nvcc. Inputs are checked first
(platforms/cuda/validation.py).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from platforms.cuda import validation
from platforms.cuda.build import load_extension
from platforms.cuda.validation import SUPPORTED_HEAD_SIZES
from platforms.interface import AttentionBackend

# Split-K planning: split a context only while the grid would leave SMs idle.
# The launched decode shape holds one or two CTAs per SM (its 3-deep rings of
# 32-token tiles fill the shared memory), and on the H100 one partition per
# context beat 2-16 at every batch of >= 32 sequences of 512-4096 tokens but
# one (benchmarks/decode_variants.py --targets; RESULTS.md). Partitions are
# at least MIN_PARTITION keys: each split costs a partial write and a combine read.
TARGET_CTAS_PER_SM = 1
MIN_PARTITION = 256
PARTITION_ALIGN = 128  # 4 warps x 32-token tiles
MAX_GRID_Y = 65535  # the prefill grid has one y row per sequence


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def split_plan(num_tokens: int, ctas_per_token: int, max_context: int, num_sms: int,
               target_ctas_per_sm: int = TARGET_CTAS_PER_SM) -> tuple[int, int]:
    """(partition_size, num_splits) for the decode grid."""
    ctas = max(1, num_tokens * ctas_per_token)
    wanted = math.ceil(target_ctas_per_sm * num_sms / ctas)
    splits = max(1, min(wanted, math.ceil(max_context / MIN_PARTITION)))
    partition = math.ceil(math.ceil(max_context / splits) / PARTITION_ALIGN) * PARTITION_ALIGN
    return partition, math.ceil(max_context / partition)


def vector_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when the kernels can read it in 16-byte vectors, else a copy."""
    elems = 16 // t.element_size()
    aligned = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s % elems == 0 for s in t.stride()[:-1]))
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


class CudaAttentionBackend(AttentionBackend):
    name = "cuda"
    supported_head_sizes = SUPPORTED_HEAD_SIZES

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        validation.check_caches(key_cache, value_cache, key_cache.dtype)
        self._write_kv(key, value, key_cache, value_cache, slot_mapping)

    def _write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        """write_kv on caches already checked."""
        validation.check_new_kv(key, value, key_cache, slot_mapping)
        load_extension().write_kv(vector_ready(key.to(key_cache.dtype)),
                                  vector_ready(value.to(value_cache.dtype)),
                                  key_cache, value_cache, slot_mapping)

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        validation.check_query(query, self.supported_dtypes)
        validation.check_caches(key_cache, value_cache, query.dtype)
        validation.check_query_matches_cache(query, key_cache)
        validation.check_metadata(block_tables, seq_lens, query_start_loc, query.device)
        validation.check_scale(float(scale))
        self._write_kv(key, value, key_cache, value_cache, slot_mapping)

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
            if num_seqs > MAX_GRID_Y:
                validation.fail("seq_lens", f"at most {MAX_GRID_Y} sequences per call, "
                                            f"got {num_seqs}")
            ext.prefill(*args, max_query_len)
            return out
        group = query.shape[1] // key_cache.shape[2]
        heads_per_cta = 16 if tensor_cores else 8
        ctas_per_token = key_cache.shape[2] * math.ceil(group / heads_per_cta)
        partition, splits = split_plan(query.shape[0], ctas_per_token, max_seq_len, num_sms)
        tokens_are_seqs = query.shape[0] == num_seqs and max_query_len == 1
        ext.decode(*args, partition, splits, tokens_are_seqs, tensor_cores)
        return out
