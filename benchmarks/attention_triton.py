"""Launch-shape sweep of the Triton decode kernel: which tile, warps, stages, splits.

The Triton row of the decode/prefill tables is `attention_kernels.py
--backends triton`; this script times the same decode step (its inputs and
timer: bf16, 32 q / 8 kv heads, block 16, scattered pages, L2 flushed,
median of CUDA events) under every launch shape at a few (B, L, D) points,
and prints each shape's effective bandwidth (K+V bytes / time) with its ratio
to the shape `platforms.rocm.tuning` picks and to torch SDPA on a contiguous
cache, all measured in the same run.

    python benchmarks/attention_triton.py [--reps 20]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from triton.runtime.errors import OutOfResources

from attention_kernels import (BLOCK_SIZE, DTYPE, NUM_HEADS, NUM_KV_HEADS, Timer, paged_inputs,
                               sdpa_decode)
from platforms.rocm import tuning
from platforms.rocm.triton_attention import paged_attention

#: (batch, context, head_size)
POINTS = ((128, 2048, 128), (128, 2048, 64), (32, 4096, 128))
TILE_NS, WARPS, STAGES, SPLITS = (32, 64, 128), (4, 8), (2, 3), (1, 2, 4)


def sweep_point(timer: Timer, batch: int, context: int, head_size: int) -> None:
    inputs = paged_inputs(batch, context, 1, head_size)
    query, _, _, key_cache, value_cache, _, block_tables, seq_lens, query_start_loc = inputs
    scale = head_size ** -0.5
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * head_size * DTYPE.itemsize
    group = NUM_HEADS // NUM_KV_HEADS
    picked = tuning.attention_config(tuning.target_backend(), head_size, group, 1,
                                     DTYPE.itemsize)
    picked_splits = tuning.num_kv_splits(batch, NUM_KV_HEADS, context, 1,
                                         tuning.compute_units(query.device))

    def step_ms(config: tuning.KernelConfig, splits: int) -> float:
        return timer.ms(lambda: paged_attention(query, key_cache, value_cache, block_tables,
                                                seq_lens, query_start_loc, scale, config,
                                                splits))

    picked_ms = step_ms(picked, picked_splits)
    sdpa_ms = sdpa_decode(timer, query, key_cache, value_cache, block_tables, scale)[0]
    print(f"\nB={batch} L={context} D={head_size}: picked {picked} splits={picked_splits} "
          f"{kv_bytes / picked_ms / 1e9:.2f} TB/s; sdpa {kv_bytes / sdpa_ms / 1e9:.2f} TB/s")
    print(f"{'tile_n':>6} {'warps':>5} {'stages':>6} {'splits':>6} {'TB/s':>6} "
          f"{'/picked':>7} {'/sdpa':>6}")
    # more splits only help while the sequences x KV heads leave compute units idle
    splits_tried = SPLITS if batch * NUM_KV_HEADS < tuning.compute_units(query.device) else (1,)
    for tile_n, warps, stages, splits in itertools.product(TILE_NS, WARPS, STAGES, splits_tried):
        config = tuning.KernelConfig(picked.block_m, picked.block_q, tile_n, warps, stages)
        try:
            ms = step_ms(config, splits)
        except OutOfResources:
            print(f"{tile_n:>6} {warps:>5} {stages:>6} {splits:>6} out of shared memory")
            continue
        print(f"{tile_n:>6} {warps:>5} {stages:>6} {splits:>6} {kv_bytes / ms / 1e9:>6.2f} "
              f"{picked_ms / ms:>7.2f} {sdpa_ms / ms:>6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU (CUDA or ROCm build of torch); none is visible")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; {NUM_HEADS} q / {NUM_KV_HEADS} kv heads, {DTYPE}, "
          f"block {BLOCK_SIZE}")
    timer = Timer(args.reps)
    for batch, context, head_size in POINTS:
        sweep_point(timer, batch, context, head_size)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
