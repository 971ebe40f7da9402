"""Launch-shape sweep of the Triton attention kernel: which rows, tile, warps, stages, splits.

The Triton rows of the decode/prefill tables are `attention_kernels.py
--backends triton`; this script times the same steps (its inputs and timer:
bf16, 32 q / 8 kv heads, block 16, scattered pages, L2 flushed, median of
CUDA events) under every launch shape, and prints each shape's rate
(decode: K+V bytes / time in TB/s; prefill: causal attention TFLOP/s) with
its ratio to the shape `platforms.rocm.tuning` picks and to torch SDPA
(decode: contiguous cache; prefill: contiguous causal), all in the same run.

    python benchmarks/attention_triton.py [--reps 20]
"""

from __future__ import annotations

import argparse
import itertools
from typing import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

from attention_kernels import (BLOCK_SIZE, DTYPE, NUM_HEADS, NUM_KV_HEADS, PREFILL_LEN,
                               PREFILL_PROMPTS, Timer, paged_inputs, prefill_row, sdpa_decode)
from platforms.rocm import tuning
from platforms.rocm.triton_attention import paged_attention

GROUP = NUM_HEADS // NUM_KV_HEADS
#: decode (batch, context, head_size) points and the shapes tried at each
DECODE_POINTS = ((128, 2048, 128), (128, 2048, 64), (32, 4096, 128))
DECODE_TILE_NS, DECODE_WARPS, DECODE_STAGES = (32, 64, 128), (4, 8), (2, 3)
DECODE_SPLITS = (1, 2, 4)
#: prefill (PREFILL_PROMPTS x PREFILL_LEN, causal) head sizes and shapes tried
PREFILL_HEAD_SIZES = (64, 128)
PREFILL_BLOCK_MS, PREFILL_TILE_NS = (64, 128), (32, 64)
PREFILL_WARPS, PREFILL_STAGES = (4, 8), (2, 3)

Candidate = tuple[tuning.KernelConfig, int]  # launch shape, kv splits


def sweep(title: str, amount: float, unit: str, baseline_ms: float,
          step_ms: Callable[[tuning.KernelConfig, int], float], picked: Candidate,
          candidates: list[Candidate]) -> None:
    """Print `amount / time` (in 1e12 `unit`/s) of each candidate with its ratios."""
    picked_ms = step_ms(*picked)
    print(f"\n{title}: picked {picked[0]} splits={picked[1]} {amount / picked_ms / 1e9:.2f}; "
          f"sdpa {amount / baseline_ms / 1e9:.2f} ({unit})")
    print(f"{'block_m':>7} {'tile_n':>6} {'warps':>5} {'stages':>6} {'splits':>6} {unit:>7} "
          f"{'/picked':>7} {'/sdpa':>6}")
    for config, splits in candidates:
        shape = (f"{config.block_m:>7} {config.tile_n:>6} {config.num_warps:>5} "
                 f"{config.num_stages:>6} {splits:>6}")
        try:
            ms = step_ms(config, splits)
        except OutOfResources:
            print(f"{shape} out of shared memory")
            continue
        print(f"{shape} {amount / ms / 1e9:>7.2f} {picked_ms / ms:>7.2f} {baseline_ms / ms:>6.2f}",
              flush=True)


def paged_step_ms(timer: Timer, inputs: tuple) -> Callable[[tuning.KernelConfig, int], float]:
    query, _, _, key_cache, value_cache, _, block_tables, seq_lens, query_start_loc = inputs
    scale = query.shape[-1] ** -0.5
    return lambda config, splits: timer.ms(lambda: paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, config,
        splits))


def sweep_decode(timer: Timer, batch: int, context: int, head_size: int) -> None:
    inputs = paged_inputs(batch, context, 1, head_size)
    query, key_cache, value_cache, block_tables = inputs[0], inputs[3], inputs[4], inputs[6]
    picked = (tuning.attention_config(tuning.target_backend(), head_size, GROUP, 1,
                                      DTYPE.itemsize),
              tuning.num_kv_splits(batch, NUM_KV_HEADS, context, 1,
                                   tuning.compute_units(query.device)))
    # more splits only help while the sequences x KV heads leave compute units idle
    idle = batch * NUM_KV_HEADS < tuning.compute_units(query.device)
    candidates = [(tuning.KernelConfig(picked[0].block_m, 1, tile_n, warps, stages), splits)
                  for tile_n, warps, stages, splits in itertools.product(
                      DECODE_TILE_NS, DECODE_WARPS, DECODE_STAGES,
                      DECODE_SPLITS if idle else (1,))]
    sdpa_ms = sdpa_decode(timer, query, key_cache, value_cache, block_tables,
                          head_size ** -0.5)[0]
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * head_size * DTYPE.itemsize
    sweep(f"decode B={batch} L={context} D={head_size}", kv_bytes, "TB/s", sdpa_ms,
          paged_step_ms(timer, inputs), picked, candidates)


def sweep_prefill(timer: Timer, head_size: int) -> None:
    inputs = paged_inputs(PREFILL_PROMPTS, PREFILL_LEN, PREFILL_LEN, head_size)
    picked = (tuning.attention_config(tuning.target_backend(), head_size, GROUP, PREFILL_LEN,
                                      DTYPE.itemsize), 1)
    candidates = [(tuning.KernelConfig(block_m, block_m // GROUP, tile_n, warps, stages), 1)
                  for block_m, tile_n, warps, stages in itertools.product(
                      PREFILL_BLOCK_MS, PREFILL_TILE_NS, PREFILL_WARPS, PREFILL_STAGES)]
    sdpa_ms = prefill_row(timer, {}, head_size)["sdpa"]
    flops = 4 * PREFILL_PROMPTS * NUM_HEADS * head_size * PREFILL_LEN * (PREFILL_LEN + 1) / 2
    sweep(f"prefill {PREFILL_PROMPTS}x{PREFILL_LEN} D={head_size}", flops, "TFLOP/s", sdpa_ms,
          paged_step_ms(timer, inputs), picked, candidates)


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
    for batch, context, head_size in DECODE_POINTS:
        sweep_decode(timer, batch, context, head_size)
        torch.cuda.empty_cache()
    for head_size in PREFILL_HEAD_SIZES:
        sweep_prefill(timer, head_size)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
