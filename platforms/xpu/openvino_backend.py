"""PagedAttention through OpenVINO's PagedAttention operation.

Each step runs a cached one-operation model (`openvino_model`) over the torch
tensors in place. OpenVINO runs it on the tensors' device: CPU tensors on
its CPU plugin. XPU tensors are refused: handing Intel GPU (USM) buffers to
its GPU plugin goes through remote tensors, which needs an Intel GPU to
build and check, and none is lent here.

KV cache layout: `[num_blocks, num_kv_heads, block_size, head_size]`, in the
model dtype. The block size is the plugin's (its CPU kernel refuses anything
but 32: "CPU: block size must be 32, current: 16"), so
`supported_block_sizes` holds that one value and `kv_cache_shape` rejects
others.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from platforms.interface import AttentionBackend
from platforms.xpu.openvino_model import ModelKey, compiled_model

#: torch device type -> OpenVINO device name
_OV_DEVICES = {"cpu": "CPU"}


@functools.lru_cache(maxsize=None)
def plugin_block_size(device: str) -> int:
    """The block size the `device` plugin lays its KV cache out in."""
    return compiled_model(ModelKey(device, torch.float32, 1, 1, 64)).block_size


class OpenVinoBackend(AttentionBackend):
    name = "openvino"

    @property
    def supported_block_sizes(self) -> tuple[int, ...]:
        return (plugin_block_size("CPU"),)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        if block_size not in self.supported_block_sizes:
            raise ValueError(f"block_size {block_size}: OpenVINO's CPU plugin runs only "
                             f"block_size {self.supported_block_sizes[0]}")
        return (num_blocks, num_kv_heads, block_size, head_size)

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        block_size = key_cache.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        key_cache[blocks, :, offsets] = key[keep].to(key_cache.dtype)
        value_cache[blocks, :, offsets] = value[keep].to(value_cache.dtype)

    def forward(self, query, key, value, key_cache, value_cache, slot_mapping,
                block_tables, seq_lens, query_start_loc, scale,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        device = _ov_device(query)
        _check_caches(key_cache, value_cache, query.dtype)
        num_tokens, num_heads, head_size = query.shape
        model = compiled_model(ModelKey(device, query.dtype, num_heads, key.shape[1],
                                        head_size))
        if key_cache.shape[2] != model.block_size:
            raise ValueError(f"key_cache block size {key_cache.shape[2]}: OpenVINO's "
                             f"{device} plugin runs only block_size {model.block_size}")
        self.write_kv(key, value, key_cache, value_cache, slot_mapping)
        out = torch.empty_like(query)
        if num_tokens == 0:
            return out
        inputs = _paged_inputs(block_tables, seq_lens, query_start_loc, model.block_size,
                               max_seq_len)
        inputs.update(
            query=query.reshape(num_tokens, -1).contiguous(),
            key=key.reshape(num_tokens, -1).contiguous(),
            value=value.reshape(num_tokens, -1).contiguous(),
            key_cache=key_cache, value_cache=value_cache,
            scale=torch.tensor(scale, dtype=torch.float32))
        # OpenVINO's CPU kernel zeroes the value-cache slots past a sequence's
        # last token when it prefills over cached context; forward may change
        # only slot_mapping's slots, so those sequences' last blocks are put back.
        last_blocks = _last_blocks(block_tables, seq_lens, query_start_loc, model.block_size)
        saved = value_cache[last_blocks]
        model.run(inputs, out.view(num_tokens, -1))
        value_cache[last_blocks] = saved
        return out


def _ov_device(query: torch.Tensor) -> str:
    if query.device.type not in _OV_DEVICES:
        raise ValueError(f"query is on {query.device}: the openvino backend runs on CPU "
                         "tensors only (XPU buffers are not handed to OpenVINO's GPU plugin)")
    return _OV_DEVICES[query.device.type]


def _check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor,
                  dtype: torch.dtype) -> None:
    for field, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dtype != dtype or cache.dim() != 4 or not cache.is_contiguous():
            raise ValueError(f"{field} must be a contiguous 4-d {dtype} tensor "
                             f"[num_blocks, num_kv_heads, block_size, head_size]; got "
                             f"{cache.dtype} {tuple(cache.shape)}")


def _last_blocks(block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 query_start_loc: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block ids [n] holding the last token of each sequence with several new tokens."""
    several = query_start_loc.diff() > 1
    last = (seq_lens[several].long() - 1) // block_size
    return block_tables[several].gather(1, last.unsqueeze(1)).squeeze(1).long()


def _paged_inputs(block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, block_size: int,
                  max_seq_len: Optional[int]) -> dict[str, torch.Tensor]:
    """The contract's metadata in the operation's terms (all int32).

    block_indices: each sequence's used block ids (its first
    ceil(seq_len / block_size) block-table entries), concatenated.
    """
    blocks_per_seq = (seq_lens + block_size - 1) // block_size
    if int(blocks_per_seq.max()) > block_tables.shape[1]:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns; seq_lens need "
                         f"{int(blocks_per_seq.max())} blocks of {block_size}")
    used = torch.arange(block_tables.shape[1]) < blocks_per_seq.unsqueeze(1)
    cumulative = blocks_per_seq.cumsum(0, dtype=torch.int32)
    return {
        "past_lens": (seq_lens - query_start_loc.diff()).to(torch.int32),
        "subsequence_begins": query_start_loc.to(torch.int32).contiguous(),
        "block_indices": block_tables[used].to(torch.int32),
        "block_indices_begins": torch.nn.functional.pad(cumulative, (1, 0)),
        "max_context_len": torch.tensor(max_seq_len or int(seq_lens.max()),
                                        dtype=torch.int32),
    }
