"""Launch shapes of the CUDA decode kernel, checked then timed in one run (bf16).

    python benchmarks/decode_variants.py [--shapes 128x2048,32x512] [--heads 64,128]

Builds benchmarks/decode_variants.cu (the tensor-core decode kernel of
platforms/cuda/csrc in several `DecodeMmaShape`s; variant 0 is the launched
one) with nvcc for this GPU and drives it through ctypes. First every variant
must match a float32 reference on odd head/GQA shapes, block sizes 8/16/32,
NaN-poisoned free slots and contexts cut into many (some empty) partitions.
Then, for each decode shape (32 query / 8 KV heads, block 16, random block
table), each variant is timed at several context splits: effective bandwidth
= K+V bytes / median CUDA-event time of write_kv + decode + combine (what one
`forward` launches), with L2 flushed before each run, as in
benchmarks/attention_kernels.py; SDPA on a contiguous cache is measured in the
same run. The table gives each variant's best TB/s and its number of splits;
`plan` is what platforms/cuda/backend.split_plan picks for variant 0;
`--targets 4,8,16` adds variant 0's TB/s at the splits split_plan picks for
each of those CTA-per-SM targets (the planner's one tuning constant).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from attention_kernels import Timer
from platforms.cuda.backend import split_plan
from platforms.cuda.build import CSRC, arch_flag, find_nvcc

HERE = Path(__file__).resolve().parent
DTYPE = torch.bfloat16
NUM_HEADS, NUM_KV_HEADS, BLOCK_SIZE = 32, 8, 16
TOLERANCE = 1.6e-2  # bf16, the conformance metric (ci/matrix.py)


class AttentionParams(ctypes.Structure):
    """platforms/cuda/csrc/paged_attention.h, field for field."""

    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "out", "query", "key_cache", "value_cache", "block_tables", "seq_lens",
        "query_start_loc", "partial_out", "partial_ml")]
        + [(name, ctypes.c_int64) for name in (
            "query_stride_token", "query_stride_head", "block_table_stride")]
        + [(name, ctypes.c_int) for name in (
            "num_tokens", "num_seqs", "num_heads", "num_kv_heads", "head_size", "block_size",
            "partition_size", "num_splits")]
        + [("tokens_are_seqs", ctypes.c_bool), ("scale", ctypes.c_float)])


class WriteKvParams(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "key", "value", "key_cache", "value_cache", "slot_mapping")]
        + [(name, ctypes.c_int64) for name in (
            "key_stride_token", "key_stride_head", "value_stride_token", "value_stride_head")]
        + [(name, ctypes.c_int) for name in (
            "num_tokens", "num_kv_heads", "head_size", "element_size")])


def build_library(out_dir: Path) -> ctypes.CDLL:
    """nvcc-compiles the variants (and write_kv) for this GPU into out_dir."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    library = out_dir / "libdecode_variants.so"
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-O3",
                    arch_flag(torch.cuda.get_device_capability()),
                    str(HERE / "decode_variants.cu"), str(CSRC / "write_kv.cu"),
                    "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.dv_variant_name.restype = ctypes.c_char_p
    if (lib.dv_params_size() != ctypes.sizeof(AttentionParams)
            or lib.dv_write_kv_params_size() != ctypes.sizeof(WriteKvParams)):
        raise SystemExit("ctypes structs differ from paged_attention.h")
    return lib


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what}: CUDA error {rc}")


class DecodeBatch:
    """One decode step (one new token per sequence) on a paged bf16 cache.

    key/value_cache [num_blocks, block_size, kv_heads, head_size]; the blocks
    of sequence b are a random permutation (block_tables [B, max_blocks]);
    slots no sequence owns hold NaN when `poison`. write_kv() stores the new
    tokens' K/V at position seq_len - 1, after which the cache holds the
    whole context.
    """

    def __init__(self, lib, seq_lens, num_heads, num_kv_heads, head_size, block_size,
                 poison=True):
        self.lib, self.seq_lens_list = lib, list(seq_lens)
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.block_size, batch = block_size, len(seq_lens)
        blocks = [math.ceil(s / block_size) for s in seq_lens]
        ids = torch.randperm(sum(blocks), device="cuda").int()
        self.block_tables = torch.zeros(batch, max(blocks) + 1, dtype=torch.int32,
                                        device="cuda")
        for b, start in enumerate(torch.tensor([0, *blocks]).cumsum(0)[:-1].tolist()):
            self.block_tables[b, :blocks[b]] = ids[start:start + blocks[b]]
        shape = (sum(blocks), block_size, num_kv_heads, head_size)
        self.key_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
        self.value_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
        if poison:
            free = torch.ones(shape[0] * block_size, dtype=torch.bool, device="cuda")
            for b in range(batch):
                free[self.slots(b, torch.arange(seq_lens[b], device="cuda"))] = False
            for cache in (self.key_cache, self.value_cache):
                cache.view(-1, num_kv_heads, head_size)[free] = float("nan")
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        self.query = torch.randn(batch, num_heads, head_size, dtype=DTYPE, device="cuda")
        self.key = torch.randn(batch, num_kv_heads, head_size, dtype=DTYPE, device="cuda")
        self.value = torch.randn_like(self.key)
        self.slot_mapping = torch.stack([self.slots(b, torch.tensor([s - 1], device="cuda"))
                                         for b, s in enumerate(seq_lens)]).flatten()
        self.out = torch.empty_like(self.query)
        self.partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def slots(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        blocks = self.block_tables[b, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    def params(self, partition_size: int, num_splits: int) -> AttentionParams:
        batch = len(self.seq_lens_list)
        if num_splits > 1 and num_splits not in self.partials:
            self.partials[num_splits] = (
                torch.empty(batch, self.num_heads, num_splits, self.head_size, device="cuda"),
                torch.empty(batch, self.num_heads, num_splits, 2, device="cuda"))
        partial_out, partial_ml = ((t.data_ptr() for t in self.partials[num_splits])
                                   if num_splits > 1 else (None, None))
        return AttentionParams(
            self.out.data_ptr(), self.query.data_ptr(), self.key_cache.data_ptr(),
            self.value_cache.data_ptr(), self.block_tables.data_ptr(), self.seq_lens.data_ptr(),
            self.query_start_loc.data_ptr(), partial_out, partial_ml, self.query.stride(0),
            self.query.stride(1), self.block_tables.stride(0), batch, batch, self.num_heads,
            self.num_kv_heads, self.head_size, self.block_size, partition_size, num_splits,
            True, self.head_size ** -0.5)

    def write_kv(self) -> None:
        params = WriteKvParams(
            self.key.data_ptr(), self.value.data_ptr(), self.key_cache.data_ptr(),
            self.value_cache.data_ptr(), self.slot_mapping.data_ptr(), self.key.stride(0),
            self.key.stride(1), self.value.stride(0), self.value.stride(1),
            len(self.seq_lens_list), self.num_kv_heads, self.head_size, DTYPE.itemsize)
        check(self.lib.dv_write_kv(ctypes.byref(params)), "write_kv")

    def forward(self, variant: int, partition_size: int, num_splits: int) -> None:
        """write_kv, decode, combine: the launches of one backend forward()."""
        params = self.params(partition_size, num_splits)
        self.write_kv()
        check(self.lib.dv_decode(variant, ctypes.byref(params)), "decode")
        check(self.lib.dv_combine(ctypes.byref(params)), "combine")

    def reference(self) -> torch.Tensor:
        """[B, heads, head_size] float32 attention over the cached context."""
        group = self.num_heads // self.num_kv_heads
        out = torch.empty(self.query.shape, dtype=torch.float32, device="cuda")
        for b, seq_len in enumerate(self.seq_lens_list):
            rows = self.slots(b, torch.arange(seq_len, device="cuda"))
            k, v = (c.view(-1, self.num_kv_heads, self.head_size)[rows].float()
                    .repeat_interleave(group, dim=1) for c in (self.key_cache, self.value_cache))
            scores = torch.einsum("hd,shd->hs", self.query[b].float(), k) * self.head_size ** -0.5
            out[b] = torch.einsum("hs,shd->hd", scores.softmax(-1), v)
        return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst (token, head) row of max |out - ref| / max |ref|; inf on NaN."""
    out = out.float()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-6)).max().item()


def check_variants(lib, variants: list[int]) -> set[int]:
    """Variants that launch and match the reference everywhere (failures printed)."""
    good = set(variants)
    lens = [1, 7, 16, 31, 257, 2100, 3, 1000, 45]
    splits = ((2112, 1), (64, 34), (192, 11), (128, 17))  # 64-token partitions: many empty
    for head_size in (64, 128):
        for heads, kv_heads in ((8, 8), (8, 2), (32, 8), (16, 1), (32, 1), (12, 3), (24, 8)):
            for block_size in (8, 16, 32):
                batch = DecodeBatch(lib, lens, heads, kv_heads, head_size, block_size)
                batch.write_kv()
                ref = batch.reference()
                for variant in sorted(good):
                    for partition_size, num_splits in splits:
                        batch.out.fill_(float("nan"))
                        params = batch.params(partition_size, num_splits)
                        rc = lib.dv_decode(variant, ctypes.byref(params)) or lib.dv_combine(
                            ctypes.byref(params)) or lib.dv_sync()
                        err = rel_err(batch.out, ref) if rc == 0 else float("nan")
                        if not err < TOLERANCE:
                            print(f"variant {variant} FAILS: head {head_size} heads {heads}/"
                                  f"{kv_heads} block {block_size} splits {num_splits}: rc {rc} "
                                  f"rel err {err:.2e}", flush=True)
                            lib.dv_sync()  # clears a launch error
                            good.discard(variant)
                            break
    return good


def split_options(context: int) -> list[tuple[int, int]]:
    """(partition_size, num_splits) pairs to try: 64-aligned partitions of >= 128 keys."""
    options = []
    for wanted in (1, 2, 3, 4, 6, 8, 12, 16):
        partition = math.ceil(math.ceil(context / wanted) / 64) * 64
        option = (partition, math.ceil(context / partition))
        if partition >= 128 and option not in options:
            options.append(option)
    return options


def sdpa_ms(timer: Timer, batch: DecodeBatch) -> float:
    """SDPA on a contiguous [B, kv_heads, L, D] copy of the (equal-length) contexts."""
    num_seqs, context = len(batch.seq_lens_list), batch.seq_lens_list[0]
    pages = batch.block_tables[:, :context // BLOCK_SIZE].long()
    k, v = (c[pages].view(num_seqs, context, NUM_KV_HEADS, -1).transpose(1, 2).contiguous()
            for c in (batch.key_cache, batch.value_cache))
    q = batch.query.view(num_seqs, NUM_HEADS, 1, -1)
    return timer.ms(lambda: F.scaled_dot_product_attention(
        q, k, v, scale=batch.head_size ** -0.5, enable_gqa=True))


def time_shape(lib, timer: Timer, variants, targets, num_sms: int, head_size: int,
               num_seqs: int, context: int):
    """{variant: (best TB/s, its splits)}, SDPA's TB/s and {target: (variant 0's TB/s,
    splits)} at split_plan's choice for each CTA-per-SM target, for one decode shape."""
    batch = DecodeBatch(lib, [context] * num_seqs, NUM_HEADS, NUM_KV_HEADS, head_size,
                        BLOCK_SIZE, poison=False)
    tbps = 2 * num_seqs * context * NUM_KV_HEADS * head_size * DTYPE.itemsize / 1e9
    best = {}
    for variant in variants:
        for partition_size, num_splits in split_options(context):
            ms = timer.ms(lambda: batch.forward(variant, partition_size, num_splits))
            if tbps / ms > best.get(variant, (0.0,))[0]:
                best[variant] = (tbps / ms, num_splits)
    planned = {}
    for target in targets:
        partition_size, num_splits = split_plan(num_seqs, NUM_KV_HEADS, context, num_sms, target)
        ms = timer.ms(lambda: batch.forward(0, partition_size, num_splits))
        planned[target] = (tbps / ms, num_splits)
    return best, tbps / sdpa_ms(timer, batch), planned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="128x2048,32x512,256x4096,32x2048,128x512",
                        help="decode shapes, sequences x context, comma-separated")
    parser.add_argument("--heads", default="64,128", help="head sizes (64 and/or 128)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--targets", default="",
                        help="split_plan CTA-per-SM targets to time variant 0 at, comma-separated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_library(Path(tmp))
        names = [lib.dv_variant_name(v).decode() for v in range(lib.dv_num_variants())]
        good = sorted(check_variants(lib, list(range(len(names)))))
        print(f"{torch.cuda.get_device_name()}: {len(good)} of {len(names)} variants match the "
              "reference; best TB/s (splits) of write_kv + decode + combine", flush=True)
        timer = Timer(args.reps)
        columns = [(h, b, c) for h in map(int, args.heads.split(",")) for b, c in shapes]
        targets = [int(t) for t in args.targets.split(",") if t]
        results = {col: time_shape(lib, timer, good, targets, num_sms, *col) for col in columns}
    print(f"{'variant':<58}" + "".join(f"{f'D{h} B{b} L{c}':>16}" for h, b, c in columns))
    for variant in good:
        print(f"{variant:>2} {names[variant]:<55}" + "".join(
            f"{results[col][0][variant][0]:>11.3f} ({results[col][0][variant][1]:>2})"
            for col in columns))
    print(f"{'plan (variant 0: splits)':<58}" + "".join(
        f"{split_plan(b, NUM_KV_HEADS, c, num_sms)[1]:>16}" for _, b, c in columns))
    print(f"{'SDPA, contiguous cache':<58}" + "".join(
        f"{results[col][1]:>16.3f}" for col in columns))
    for target in targets:
        print(f"{f'variant 0, split_plan target {target}':<58}" + "".join(
            f"{results[col][2][target][0]:>11.3f} ({results[col][2][target][1]:>2})"
            for col in columns))


if __name__ == "__main__":
    main()
