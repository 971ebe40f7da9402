"""Block shapes for the Triton PagedAttention kernels, chosen per target.

The same kernel source compiles for AMD (HIP, 64-lane wavefronts) and NVIDIA
(CUDA, 32-lane warps); only the launch shapes differ. A program owns
`block_m` query rows, `block_q` tokens times the query heads of one KV group,
so each K/V byte is loaded once per group; it walks the keys `tile_n` at a
time, a tile spanning `tile_n // block_size` cache pages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

#: the smallest M/N of a tl.dot every supported Triton version accepts
MIN_DOT_ROWS = 16
#: keys one split of a split-KV decode must at least cover to pay for its reduction
MIN_KEYS_PER_SPLIT = 256
#: upper bound on KV splits (the reduction kernel holds them all in registers)
MAX_KV_SPLITS = 16
#: bytes of one K (or V) tile, e.g. 64 keys of 128 bf16 dims (on an H100 decode
#: reached the same bandwidth with 64 and 128 such keys, and 14% more with
#: 128 keys than 64 at head_dim 64: benchmarks/RESULTS.md)
KV_TILE_BYTES = 16 * 1024
#: compute units assumed when the tensors are not on a GPU (interpreter runs)
CPU_COMPUTE_UNITS = 1


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of one paged attention call.

    block_m: query rows per program (power of two, >= 16); block_q: query
    tokens per program (block_q * group <= block_m); tile_n: keys per inner
    iteration; num_warps / num_stages: Triton launch options.
    """

    block_m: int
    block_q: int
    tile_n: int
    num_warps: int
    num_stages: int


def target_backend() -> str:
    """"hip" on a ROCm build of torch, else "cuda" (the Triton backend names)."""
    return "hip" if torch.version.hip is not None else "cuda"


@functools.lru_cache(maxsize=None)
def attention_config(backend: str, head_size: int, group: int, max_query_len: int,
                     itemsize: int) -> KernelConfig:
    """The launch shape for `backend` ("hip" or "cuda") and K/V of `itemsize` bytes.

    Decode (one query token per sequence) is bandwidth-bound: a small row
    block and long key tiles keep many loads in flight. Prefill is compute-
    bound: larger row blocks reuse each K/V tile across more queries. A K
    tile stays within KV_TILE_BYTES so a pipeline stage of K and V fits the
    64 KiB of LDS an AMD workgroup may use.
    """
    head_pad = max(MIN_DOT_ROWS, triton.next_power_of_2(head_size))
    decode = max_query_len <= 1
    max_rows = MIN_DOT_ROWS if decode else 64
    block_q = max(1, min(max_rows // group, triton.next_power_of_2(max_query_len)))
    block_m = max(MIN_DOT_ROWS, triton.next_power_of_2(block_q * group))
    # Prefill caps the tile at 64 keys: its [block_m, tile_n] scores live in registers.
    max_tile_n = 128 if decode else 64
    tile_n = max(MIN_DOT_ROWS, min(max_tile_n, KV_TILE_BYTES // (head_pad * itemsize)))
    if backend == "hip":
        # 4 wavefronts of 64 lanes. Each pipeline stage buffers a K and a V
        # tile in LDS (64 KiB per CU), so fewer stages keep more programs resident.
        return KernelConfig(block_m, block_q, tile_n, num_warps=4, num_stages=2 if decode else 1)
    return KernelConfig(block_m, block_q, tile_n, num_warps=4, num_stages=3 if decode else 2)


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, max_query_len: int,
                  compute_units: int) -> int:
    """How many KV splits a decode step uses (1 = the plain unified kernel).

    Only decode splits: a prefill tile already has enough programs. Splitting
    pays only while sequences x KV heads leave compute units without a
    program (on an H100, 256 programs on 132 SMs ran 14% slower split in two)
    and every split still covers MIN_KEYS_PER_SPLIT keys.
    """
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or programs >= compute_units:
        return 1
    wanted = triton.cdiv(2 * compute_units, max(1, programs))
    return max(1, min(wanted, max_seq_len // MIN_KEYS_PER_SPLIT, MAX_KV_SPLITS))


def compute_units(device: torch.device) -> int:
    """Streaming multiprocessors / compute units of `device`."""
    if device.type != "cuda":
        return CPU_COMPUTE_UNITS
    return torch.cuda.get_device_properties(device).multi_processor_count
