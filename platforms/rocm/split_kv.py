"""Combine the partial results of a split-KV decode into the final output.

Layouts: `partial_out [num_splits, num_tokens, num_heads, head_size]` fp32,
each split's output already normalised by its own softmax sum;
`partial_lse [num_splits, num_tokens, num_heads]` fp32, each split's
log2-sum-exp2 of its scaled scores (-inf for a split that saw no key);
`out [num_tokens, num_heads, head_size]`.

The final output is the average of the splits weighted by exp2(lse_k - max lse).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Counts that change every step stay unspecialized (no new variants while serving).
@triton.jit(do_not_specialize=["num_splits", "num_tokens"])
def combine_splits_kernel(out_ptr, partial_out_ptr, partial_lse_ptr, num_splits, num_tokens,
                          stride_o_t, stride_o_h, HEAD_SIZE: tl.constexpr,
                          HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < num_splits
    part_row = (splits * num_tokens + token) * num_heads + head
    lse = tl.load(partial_lse_ptr + part_row, mask=split_valid, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    part = tl.load(partial_out_ptr + part_row[:, None] * HEAD_SIZE + dims[None, :],
                   mask=split_valid[:, None] & dim_valid[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_valid)


def combine_constexprs(head_size: int, num_splits: int) -> dict:
    """The compile-time arguments of `combine_splits_kernel`."""
    return dict(HEAD_SIZE=head_size, HEAD_PAD=triton.next_power_of_2(head_size),
                SPLITS_PAD=triton.next_power_of_2(num_splits))


def combine_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor,
                   out: torch.Tensor) -> None:
    """Reduce the splits of `partial_out` / `partial_lse` into `out` (in place)."""
    num_splits, num_tokens, num_heads, head_size = partial_out.shape
    combine_splits_kernel[(num_tokens, num_heads)](
        out, partial_out, partial_lse, num_splits, num_tokens, out.stride(0), out.stride(1),
        **combine_constexprs(head_size, num_splits))
