"""Collectives over the tensor-parallel group; each is the identity on a single rank.

`all_reduce` sums the partial outputs of row-parallel layers (also inside a
captured CUDA graph: NCCL collectives are capturable) and `all_gather` joins
vocabulary shards of logits. Rank 0's step plans travel through
`engine.distributed.step_channel`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.distributed.parallel_state import get_tp_group


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place; returns it."""
    group = get_tp_group()
    if group.world_size > 1:
        dist.all_reduce(tensor, group=group.device_group)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `tensor` (same shape on all) along `dim`, rank order."""
    group = get_tp_group()
    if group.world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(group.world_size)]
    dist.all_gather(parts, tensor, group=group.device_group)
    return torch.cat(parts, dim=dim)


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's `value` (ranks agree on one KV cache size)."""
    group = get_tp_group()
    if group.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return int(tensor.item())
