"""Paged attention kernels on one GPU: decode bandwidth and prefill TFLOP/s, same run.

    python benchmarks/attention_kernels.py [--backends cuda,triton] [--reps 30]

Decode (one new token per sequence, bf16, 32 query / 8 KV heads, block 16,
block tables a random permutation of the cache): effective bandwidth = K+V
bytes of the context / median kernel time, for each paged backend asked
(`cuda`: platforms/cuda; `triton`: platforms.get("rocm")'s Triton kernels,
compiled for this GPU), torch SDPA on a contiguous [B, KV heads, L, D] cache
(the no-paging baseline) and gather-then-SDPA (copy the blocks out, then
SDPA). Prefill: 8 prompts of 2048 tokens, causal, TFLOP/s of the paged
backends and of SDPA on contiguous tensors. A device-to-device copy gives
the bandwidth ceiling. Every time is the median of `--reps` runs timed with
CUDA events, each after overwriting a 256 MiB buffer so no run starts with
its data in L2 and with the GPU held back until `fn` is enqueued (kernel
time, not Python time; the host cost of one `forward` call is printed apart).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import platforms

DTYPE = torch.bfloat16
NUM_HEADS, NUM_KV_HEADS, BLOCK_SIZE = 32, 8, 16
DECODE_BATCHES, DECODE_CONTEXTS, HEAD_SIZES = (32, 128, 256), (512, 2048, 4096), (64, 128)
PREFILL_PROMPTS, PREFILL_LEN = 8, 2048
PAGED_BACKENDS = {"cuda": ("cuda", "cuda"), "triton": ("rocm", "triton")}


class Timer:
    """Median CUDA-event time of a function, with L2 flushed before each run."""

    def __init__(self, reps: int):
        self.reps = reps
        self.errors: dict[str, str] = {}
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def ms_or_nan(self, name: str, fn: Callable[[], object]) -> float:
        """`ms(fn)`, or NaN (the error printed once per name) when `fn` raises."""
        try:
            return self.ms(fn)
        except Exception as error:  # one broken backend must not hide the others' rows
            if name not in self.errors:
                self.errors[name] = f"{type(error).__name__}: {error}"
                print(f"backend {name} failed: {self.errors[name]}", flush=True)
            return float("nan")

    def ms(self, fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush.fill_(1)
            # The GPU spins while the host enqueues fn, so host-side overhead
            # (Python, launches) stays out of the kernel time.
            torch.cuda._sleep(1_000_000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def load_backends(names: list[str]) -> dict[str, object]:
    """Backend objects by name; a backend that cannot load is reported and left out."""
    backends = {}
    for name in names:
        platform, backend = PAGED_BACKENDS[name]
        try:
            backends[name] = platforms.get(platform).attention_backend(backend)
        except Exception as error:  # e.g. a missing Triton: the other rows still run
            print(f"backend {name} not run: {type(error).__name__}: {error}")
    return backends


def paged_inputs(batch: int, seq_len: int, query_len: int, head_size: int):
    """Random paged caches holding `seq_len - query_len` tokens per sequence, and a step.

    Returns (query, key, value, key_cache, value_cache, slot_mapping,
    block_tables, seq_lens, query_start_loc) on the GPU.
    """
    blocks_per_seq = seq_len // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, head_size)
    key_cache = torch.randn(cache_shape, dtype=DTYPE, device="cuda")
    value_cache = torch.randn(cache_shape, dtype=DTYPE, device="cuda")
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    block_tables = block_tables.view(batch, blocks_per_seq)
    positions = torch.arange(seq_len - query_len, seq_len, device="cuda")
    slots = block_tables[:, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    num_tokens = batch * query_len
    query = torch.randn(num_tokens, NUM_HEADS, head_size, dtype=DTYPE, device="cuda")
    key = torch.randn(num_tokens, NUM_KV_HEADS, head_size, dtype=DTYPE, device="cuda")
    value = torch.randn_like(key)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(0, num_tokens + 1, query_len, dtype=torch.int32, device="cuda")
    return (query, key, value, key_cache, value_cache, slots.flatten(), block_tables, seq_lens,
            query_start_loc)


def gathered(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, KV heads, L, D] view of each sequence's blocks, copied out of the cache."""
    batch = block_tables.shape[0]
    return cache[block_tables].view(batch, -1, NUM_KV_HEADS, cache.shape[-1]).transpose(1, 2)


def sdpa_decode(timer: Timer, query, key_cache, value_cache, block_tables, scale):
    """(ms on a contiguous cache, ms of gather-then-SDPA, output [B, heads, D])."""
    batch, head_size = block_tables.shape[0], query.shape[-1]
    q4 = query.view(batch, NUM_HEADS, 1, head_size)
    k_contig = gathered(key_cache, block_tables).contiguous()
    v_contig = gathered(value_cache, block_tables).contiguous()
    out = F.scaled_dot_product_attention(q4, k_contig, v_contig, scale=scale, enable_gqa=True)
    contiguous_ms = timer.ms(lambda: F.scaled_dot_product_attention(
        q4, k_contig, v_contig, scale=scale, enable_gqa=True))
    k_contig = v_contig = None  # free before the gather copies
    gather_ms = timer.ms(lambda: F.scaled_dot_product_attention(
        q4, gathered(key_cache, block_tables), gathered(value_cache, block_tables), scale=scale,
        enable_gqa=True))
    return contiguous_ms, gather_ms, out.view(batch, NUM_HEADS, head_size)


def decode_row(timer: Timer, backends: dict, batch: int, seq_len: int, head_size: int) -> dict:
    inputs = paged_inputs(batch, seq_len, 1, head_size)
    query, _, _, key_cache, value_cache, _, block_tables, _, _ = inputs
    scale = head_size ** -0.5
    row, outputs = {}, {}
    for name, backend in backends.items():
        def step(backend=backend, name=name):
            outputs[name] = backend.forward(*inputs, scale, max_seq_len=seq_len, max_query_len=1)
        row[name] = timer.ms_or_nan(name, step)
    # After the paged forwards, so the caches hold the new tokens too.
    row["sdpa"], row["gather+sdpa"], reference = sdpa_decode(
        timer, query, key_cache, value_cache, block_tables, scale)
    row["max_err"] = max([(out.float() - reference.float()).abs().max().item()
                          for out in outputs.values()] or [float("nan")])
    return row


def prefill_row(timer: Timer, backends: dict, head_size: int) -> dict:
    inputs = paged_inputs(PREFILL_PROMPTS, PREFILL_LEN, PREFILL_LEN, head_size)
    query, key, value = inputs[:3]
    scale = head_size ** -0.5
    row = {}
    for name, backend in backends.items():
        row[name] = timer.ms_or_nan(name, lambda backend=backend: backend.forward(
            *inputs, scale, max_seq_len=PREFILL_LEN, max_query_len=PREFILL_LEN))
    shape = (PREFILL_PROMPTS, PREFILL_LEN, -1, head_size)
    q, k, v = (t.view(shape).transpose(1, 2).contiguous() for t in (query, key, value))
    row["sdpa"] = timer.ms(lambda: F.scaled_dot_product_attention(
        q, k, v, scale=scale, is_causal=True, enable_gqa=True))
    return row


def copy_bandwidth(timer: Timer) -> float:
    """TB/s of a 2 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda").fill_(3)
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e12


def host_overhead_us(backends: dict) -> dict[str, float]:
    """Host time of one decode `forward` call, on a batch too small to keep the GPU busy."""
    inputs = paged_inputs(1, 64, 1, 128)
    result = {}
    for name, backend in backends.items():
        def step(backend=backend):
            backend.forward(*inputs, 128 ** -0.5, max_seq_len=64, max_query_len=1)
        try:
            step()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(200):
                step()
            torch.cuda.synchronize()
            result[name] = (time.perf_counter() - started) / 200 * 1e6
        except Exception:  # reported by the timed rows already
            result[name] = float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cuda",
                        help=f"paged backends, comma-separated, of {sorted(PAGED_BACKENDS)}")
    parser.add_argument("--reps", type=int, default=30, help="timed runs per measurement")
    args = parser.parse_args()
    names = [name for name in args.backends.split(",") if name]
    unknown = [name for name in names if name not in PAGED_BACKENDS]
    if unknown:
        parser.error(f"unknown backends {unknown}; known: {sorted(PAGED_BACKENDS)}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (torch.cuda.is_available() is False)")
    timer = Timer(args.reps)
    backends = load_backends(names)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"copy bandwidth {copy_bandwidth(timer):.2f} TB/s (read + write)")
    print_decode_table(timer, backends)
    print_prefill_table(timer, backends)
    overhead = host_overhead_us(backends)
    print("\nhost time of one decode forward() call (B=1, L=64), us: "
          + ", ".join(f"{name} {us:.1f}" for name, us in overhead.items()))


def print_decode_table(timer: Timer, backends: dict) -> None:
    columns = [*backends, "sdpa", "gather+sdpa"]
    print(f"\ndecode, {DTYPE}, {NUM_HEADS} q / {NUM_KV_HEADS} kv heads, block {BLOCK_SIZE}: "
          "effective bandwidth TB/s (K+V bytes / median time)")
    print(f"{'D':>4} {'B':>4} {'L':>5} " + " ".join(f"{c:>12}" for c in columns)
          + f" {'first/sdpa':>10} {'us first':>9} {'max|err|':>9}")
    for head_size in HEAD_SIZES:
        for batch in DECODE_BATCHES:
            for seq_len in DECODE_CONTEXTS:
                row = decode_row(timer, backends, batch, seq_len, head_size)
                kv_bytes = 2 * batch * seq_len * NUM_KV_HEADS * head_size * DTYPE.itemsize
                tbps = {c: kv_bytes / (row[c] * 1e-3) / 1e12 for c in columns}
                print(f"{head_size:>4} {batch:>4} {seq_len:>5} "
                      + " ".join(f"{tbps[c]:>12.2f}" for c in columns)
                      + f" {row['sdpa'] / row[columns[0]]:>10.2f}"
                      + f" {row[columns[0]] * 1e3:>9.1f} {row['max_err']:>9.2e}", flush=True)
                torch.cuda.empty_cache()


def print_prefill_table(timer: Timer, backends: dict) -> None:
    columns = [*backends, "sdpa"]
    print(f"\nprefill, {DTYPE}, {PREFILL_PROMPTS} x {PREFILL_LEN} tokens, causal, "
          f"{NUM_HEADS} q / {NUM_KV_HEADS} kv heads: TFLOP/s (ms)")
    print(f"{'D':>4} " + " ".join(f"{c:>16}" for c in columns))
    for head_size in HEAD_SIZES:
        row = prefill_row(timer, backends, head_size)
        flops = 4 * PREFILL_PROMPTS * NUM_HEADS * head_size * PREFILL_LEN * (PREFILL_LEN + 1) / 2
        cells = [f"{flops / (row[c] * 1e-3) / 1e12:>7.1f} ({row[c]:>6.3f})" for c in columns]
        print(f"{head_size:>4} " + " ".join(f"{cell:>16}" for cell in cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
