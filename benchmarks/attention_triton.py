"""Decode bandwidth of the Triton PagedAttention kernel vs torch SDPA, same run.

Every sequence of a batch decodes one token over `L` cached tokens, bf16,
32 query heads over 8 KV heads, cache pages of 16 tokens scattered at random
through the cache. Effective bandwidth = K+V bytes the step must read
(B * L * kv_heads * head_dim * 2 bytes * 2) / kernel time (median of
triton.testing.do_bench, L2 flushed between runs). The baseline is torch's
scaled_dot_product_attention over the same K/V copied into a contiguous
[B, kv_heads, L, head_dim] cache, with the 4 query heads of a KV group as 4
query rows (equal to GQA decode, no key copies). Prints both and their ratio.

    python benchmarks/attention_triton.py            # the B x L x head_dim grid
    python benchmarks/attention_triton.py --sweep    # launch shapes at a few points
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from platforms.rocm import tuning
from platforms.rocm.backend import TritonAttentionBackend
from platforms.rocm.triton_attention import paged_attention

NUM_HEADS, NUM_KV_HEADS, BLOCK_SIZE = 32, 8, 16
DTYPE = torch.bfloat16
BATCHES, CONTEXTS, HEAD_SIZES = (32, 128, 256), (512, 2048, 4096), (64, 128)
SWEEP_POINTS = ((128, 2048, 128), (128, 2048, 64), (32, 4096, 128))


class DecodeStep:
    """One decode step's inputs on the GPU: query [B, H, D], paged caches, block tables."""

    def __init__(self, batch: int, context: int, head_size: int, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(batch * context + head_size)
        blocks_per_seq = triton.cdiv(context, BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, head_size)
        self.key_cache = torch.randn(shape, generator=gen, device=device).to(DTYPE)
        self.value_cache = torch.randn(shape, generator=gen, device=device).to(DTYPE)
        order = torch.randperm(num_blocks, generator=gen, device=device)
        self.block_tables = order.view(batch, blocks_per_seq).to(torch.int32)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.query = torch.randn(batch, NUM_HEADS, head_size, generator=gen,
                                 device=device).to(DTYPE)
        self.scale = head_size ** -0.5
        self.context = context
        self.kv_bytes = 2 * batch * context * NUM_KV_HEADS * head_size * DTYPE.itemsize

    def contiguous_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as [B, kv_heads, L, D] (the SDPA baseline's cache)."""
        def gather(cache: torch.Tensor) -> torch.Tensor:
            pages = cache[self.block_tables.long()]  # [B, blocks, block_size, kvh, D]
            return pages.flatten(1, 2)[:, :self.context].transpose(1, 2).contiguous()
        return gather(self.key_cache), gather(self.value_cache)

    def grouped_query(self) -> torch.Tensor:
        """query as [B, kv_heads, group, D]: a KV group's heads as query rows."""
        batch, _, head_size = self.query.shape
        return self.query.view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, head_size)


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_grid(device: torch.device) -> None:
    backend = TritonAttentionBackend()
    print(f"{'B':>4} {'L':>5} {'D':>4} {'splits':>6} {'triton us':>9} {'triton TB/s':>11} "
          f"{'sdpa us':>8} {'sdpa TB/s':>9} {'ratio':>6} {'max diff':>8}")
    for head_size, batch, context in itertools.product(HEAD_SIZES, BATCHES, CONTEXTS):
        step = DecodeStep(batch, context, head_size, device)

        def triton_step():
            return backend.attend(step.query, step.key_cache, step.value_cache,
                                  step.block_tables, step.seq_lens, step.query_start_loc,
                                  step.scale, max_seq_len=context, max_query_len=1)

        key, value = step.contiguous_kv()
        query = step.grouped_query()

        def sdpa_step():
            return F.scaled_dot_product_attention(query, key, value, scale=step.scale)

        diff = (triton_step().float() - sdpa_step().reshape(step.query.shape).float()).abs()
        splits = tuning.num_kv_splits(batch, NUM_KV_HEADS, context, 1,
                                      tuning.compute_units(device))
        triton_ms, sdpa_ms = bench_ms(triton_step), bench_ms(sdpa_step)
        triton_bw, sdpa_bw = step.kv_bytes / triton_ms / 1e9, step.kv_bytes / sdpa_ms / 1e9
        print(f"{batch:>4} {context:>5} {head_size:>4} {splits:>6} {triton_ms * 1e3:>9.1f} "
              f"{triton_bw:>11.2f} {sdpa_ms * 1e3:>8.1f} {sdpa_bw:>9.2f} "
              f"{triton_bw / sdpa_bw:>6.2f} {diff.max().item():>8.1e}", flush=True)
        del step, key, value


def run_sweep(device: torch.device) -> None:
    """Bandwidth of each launch shape (tile_n, warps, stages, splits) at SWEEP_POINTS."""
    base = tuning.attention_config(tuning.target_backend(), 128, NUM_HEADS // NUM_KV_HEADS, 1,
                                   DTYPE.itemsize)
    for batch, context, head_size in SWEEP_POINTS:
        step = DecodeStep(batch, context, head_size, device)
        print(f"\nB={batch} L={context} D={head_size}: default {base}")
        split_choices = (1, 2, 4) if batch * NUM_KV_HEADS < tuning.compute_units(device) else (1,)
        for tile_n, warps, stages, splits in itertools.product(
                (32, 64, 128), (4, 8), (2, 3), split_choices):
            config = tuning.KernelConfig(base.block_m, 1, tile_n, warps, stages)
            try:
                ms = bench_ms(lambda: paged_attention(
                    step.query, step.key_cache, step.value_cache, step.block_tables,
                    step.seq_lens, step.query_start_loc, step.scale, config, splits))
            except Exception as error:  # e.g. out of shared memory: report, keep sweeping
                print(f"  tile_n={tile_n:<3} warps={warps} stages={stages} splits={splits}: "
                      f"{type(error).__name__}")
                continue
            print(f"  tile_n={tile_n:<3} warps={warps} stages={stages} splits={splits}: "
                  f"{step.kv_bytes / ms / 1e9:6.2f} TB/s", flush=True)
        del step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="time every launch shape at a few points instead of the grid")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU (CUDA or ROCm build of torch); none is visible")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, "
          f"triton {triton.__version__}; {NUM_HEADS} q heads / {NUM_KV_HEADS} kv heads, "
          f"{DTYPE}, block {BLOCK_SIZE}")
    if args.sweep:
        run_sweep(device)
    else:
        run_grid(device)


if __name__ == "__main__":
    main()
