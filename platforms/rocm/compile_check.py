"""Compile every Triton kernel ahead of time for AMD and NVIDIA targets, no GPU needed.

Proves the kernels lower to MI300X (gfx942), MI250 (gfx90a) and H100 (sm_90)
code with the launch shapes `tuning` picks for each target.
`python -m platforms.rocm.compile_check [--target NAME ...]` prints one line
per compiled kernel. Must run with TRITON_INTERPRET unset (the
interpreter replaces @triton.jit functions with Python ones).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from platforms.rocm import tuning
from platforms.rocm.split_kv import combine_constexprs, combine_splits_kernel
from platforms.rocm.triton_attention import attention_constexprs, paged_attention_kernel
from platforms.rocm.write_kv import write_kv_constexprs, write_kv_kernel

TARGETS = {
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "gfx90a": GPUTarget("hip", "gfx90a", 64),
    "sm_90": GPUTarget("cuda", 90, 32),
}
#: the binary each backend emits
BINARY = {"hip": "hsaco", "cuda": "cubin"}
#: shared memory (LDS) one program may use, by target arch: 64 KiB per workgroup
#: on CDNA2/CDNA3, 227 KiB per block on Hopper
SHARED_MEMORY_LIMIT = {"gfx942": 64 * 1024, "gfx90a": 64 * 1024, 90: 227 * 1024}
_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class AttentionVariant:
    """One launch shape of the attention kernel: dtype, heads and batch kind."""

    dtype: torch.dtype
    head_size: int
    group: int
    block_size: int
    max_query_len: int
    num_splits: int = 1

    @property
    def name(self) -> str:
        kind = "decode" if self.max_query_len == 1 else "prefill"
        return (f"attention-{kind}-{_TYPE_NAMES[self.dtype]}-d{self.head_size}-g{self.group}"
                f"-b{self.block_size}-splits{self.num_splits}")


#: decode, split-KV decode and prefill shapes over the dtypes and head sizes served
ATTENTION_VARIANTS = (
    AttentionVariant(torch.float16, 128, 4, 16, 1),
    AttentionVariant(torch.bfloat16, 64, 4, 16, 1),
    AttentionVariant(torch.bfloat16, 128, 4, 16, 1, num_splits=8),
    AttentionVariant(torch.float16, 64, 1, 16, 64),
    AttentionVariant(torch.bfloat16, 128, 4, 32, 64),
    AttentionVariant(torch.float32, 80, 8, 8, 64),
    AttentionVariant(torch.float32, 256, 1, 16, 64),
    AttentionVariant(torch.float32, 128, 8, 16, 1, num_splits=4),
)


def _signature(kernel, constexprs: dict, pointer_types: dict[str, str]) -> dict[str, str]:
    """Argument types of `kernel`: pointers as given, `scale_log2` fp32, other ints i32."""
    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in pointer_types:
            return "*" + pointer_types[name]
        return "fp32" if name == "scale_log2" else "i32"
    return {name: arg_type(name) for name in kernel.arg_names}


def _compile(kernel, constexprs: dict, pointer_types: dict[str, str], target: GPUTarget,
             options: dict) -> bytes:
    source = ASTSource(kernel, _signature(kernel, constexprs, pointer_types), constexprs)
    compiled = triton.compile(source, target=target,
                              options={"enable_fp_fusion": True, **options})
    limit = SHARED_MEMORY_LIMIT[target.arch]
    if compiled.metadata.shared > limit:
        raise RuntimeError(f"{kernel.__name__} needs {compiled.metadata.shared} bytes of shared "
                           f"memory on {target.arch}, more than its {limit}")
    return compiled.asm[BINARY[target.backend]]


def compile_attention(variant: AttentionVariant, target: GPUTarget) -> bytes:
    """The binary of the attention kernel for `variant` on `target`."""
    config = tuning.attention_config(target.backend, variant.head_size, variant.group,
                                     variant.max_query_len, variant.dtype.itemsize)
    constexprs = attention_constexprs(variant.dtype, variant.head_size, variant.group,
                                      variant.block_size, config, variant.num_splits > 1)
    dtype = _TYPE_NAMES[variant.dtype]
    pointers = {"out_ptr": dtype, "query_ptr": dtype, "key_cache_ptr": dtype,
                "value_cache_ptr": dtype, "partial_out_ptr": "fp32", "partial_lse_ptr": "fp32",
                "block_tables_ptr": "i32", "seq_lens_ptr": "i32", "query_start_loc_ptr": "i32"}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return _compile(paged_attention_kernel, constexprs, pointers, target, options)


def compile_write_kv(dtype: torch.dtype, head_size: int, block_size: int,
                     target: GPUTarget) -> bytes:
    name = _TYPE_NAMES[dtype]
    pointers = {"key_ptr": name, "value_ptr": name, "key_cache_ptr": name,
                "value_cache_ptr": name, "slot_mapping_ptr": "i64"}
    return _compile(write_kv_kernel, write_kv_constexprs(head_size, block_size), pointers,
                    target, {})


def compile_combine(dtype: torch.dtype, head_size: int, num_splits: int,
                    target: GPUTarget) -> bytes:
    pointers = {"out_ptr": _TYPE_NAMES[dtype], "partial_out_ptr": "fp32",
                "partial_lse_ptr": "fp32"}
    return _compile(combine_splits_kernel, combine_constexprs(head_size, num_splits), pointers,
                    target, {})


def kernel_builds() -> dict[str, Callable[[GPUTarget], bytes]]:
    """Every kernel variant by name, each compiling for a given target."""
    builds = {variant.name: partial(compile_attention, variant) for variant in ATTENTION_VARIANTS}
    builds["write_kv-bf16-d128-b16"] = partial(compile_write_kv, torch.bfloat16, 128, 16)
    builds["combine_splits-bf16-d128-splits8"] = partial(compile_combine, torch.bfloat16, 128, 8)
    return builds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="target to compile for (repeatable; default: all)")
    parser.add_argument("--out", type=Path,
                        help="also write each binary to OUT/<target>-<kernel>.<hsaco|cubin>")
    args = parser.parse_args()
    for target_name in args.target or list(TARGETS):
        target = TARGETS[target_name]
        kind = BINARY[target.backend]
        for kernel, build in kernel_builds().items():
            binary = build(target)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"{target_name}-{kernel}.{kind}").write_bytes(binary)
            print(f"{target_name} {kernel} {kind} {len(binary)} bytes", flush=True)


if __name__ == "__main__":
    main()
