"""The tensor-parallel group of this process: who it is and how it talks to the others.

Layers read the group when they are built (`get_tp_group()`), to size their
shards, and the collectives (`engine.distributed.communication`) read it at
run time. A process that never joined a group sees the single-rank group:
every layer is whole and every collective is the identity, so `tp_size=1`
runs exactly the unsharded code path.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

#: how long a collective may wait for a peer before it fails
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class TensorParallelGroup:
    """One rank's view of the tensor-parallel group.

    `device_group` carries the tensor collectives (NCCL on GPUs, gloo on
    CPUs); `cpu_group` (gloo) carries the pickled step plans, so that
    broadcasting them never stages host data through the GPU. Both are None
    for the single-rank group and for a group used only to plan shards.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_group: Optional[dist.ProcessGroup] = None
    cpu_group: Optional[dist.ProcessGroup] = None

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and talks to the user."""
        return self.rank == 0


_SINGLE_RANK = TensorParallelGroup()
_group: TensorParallelGroup = _SINGLE_RANK
_owns_default_group = False


def get_tp_group() -> TensorParallelGroup:
    return _group


@contextlib.contextmanager
def planned_tp_group(world_size: int, rank: int = 0) -> Iterator[TensorParallelGroup]:
    """Build layers as rank `rank` of `world_size` would, with no processes behind it.

    Lets the engine check that a model shards (heads, vocabulary,
    intermediate size) before it starts any worker.
    """
    global _group
    previous = _group
    _group = TensorParallelGroup(rank=rank, world_size=world_size, local_rank=rank)
    try:
        yield _group
    finally:
        _group = previous


def init_tp_group(backend: str, world_size: int, rank: int, local_rank: int,
                  store: Optional[dist.Store] = None,
                  device: Optional[torch.device] = None) -> TensorParallelGroup:
    """Join (or create) the default process group and make it this process's TP group.

    The ranks meet at `store`; without one, at the torchrun environment's
    MASTER_ADDR:MASTER_PORT. When a default group already exists
    (the user's own torchrun script set one up) it is reused and left alone
    on `destroy_tp_group()`.
    """
    global _group, _owns_default_group
    if _group.world_size > 1:
        raise ValueError("tensor_parallel_size: this process already serves a "
                         "tensor-parallel engine; shut it down first")
    if not dist.is_initialized():
        # Binding the group to its GPU lets NCCL connect eagerly, on this device.
        bound = device if device is not None and device.type != "cpu" else None
        dist.init_process_group(backend, store=store, world_size=world_size, rank=rank,
                                timeout=COLLECTIVE_TIMEOUT, device_id=bound)
        _owns_default_group = True
    if dist.get_world_size() != world_size:
        raise ValueError(f"tensor_parallel_size={world_size} differs from the "
                         f"{dist.get_world_size()} processes of the process group "
                         "(only tensor parallelism is supported: WORLD_SIZE must equal it)")
    device_group = dist.group.WORLD
    cpu_group = device_group if backend == "gloo" else dist.new_group(
        backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    _group = TensorParallelGroup(rank=dist.get_rank(), world_size=world_size,
                                 local_rank=local_rank, device_group=device_group,
                                 cpu_group=cpu_group)
    return _group


def destroy_tp_group() -> None:
    """Leave the group; tears the default group down only if `init_tp_group` made it."""
    global _group, _owns_default_group
    if _owns_default_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_default_group = False
    _group = _SINGLE_RANK
