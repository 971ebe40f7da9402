"""The tensor-parallel group of this process: who it is and how it talks to the others.

Layers read the group when they are built (`get_tp_group()`), to size their
shards, and the collectives (`engine.distributed.communication`) read it at
run time. A process that never joined a group sees the single-rank group:
every layer is whole and every collective is the identity, so `tp_size=1`
runs exactly the unsharded code path.

Teardown: NCCL frees a communicator together with its peers (its finalize
and abort wait on the other ranks of the node), so `destroy_tp_group()` must
run on every rank at about the same time, once no collective is in flight;
`abort_tp_group()` is for a group whose peers are gone or stuck.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

#: how long a collective may wait for a peer before it fails
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
#: how long a worker waits for rank 0's next step: an engine may sit idle for days
STEP_WAIT_TIMEOUT = datetime.timedelta(days=365)

_HOST = torch.device("cpu")


@dataclass(frozen=True)
class TensorParallelGroup:
    """One rank's view of the tensor-parallel group.

    `device_group` carries the tensor collectives (NCCL on GPUs, gloo on
    CPUs) over tensors on `device`; `cpu_group` (gloo, its own sockets)
    carries the small host messages: each step's header (a worker blocks
    there while the engine is idle, so it has no practical timeout), the
    stop handshake and the KV-size agreement. Both are None for the
    single-rank group and for a group used only to plan shards.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_group: Optional[dist.ProcessGroup] = None
    cpu_group: Optional[dist.ProcessGroup] = None
    device: torch.device = field(default=_HOST)

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
    cpu_group = dist.new_group(backend="gloo", timeout=STEP_WAIT_TIMEOUT)
    _group = TensorParallelGroup(rank=dist.get_rank(), world_size=world_size,
                                 local_rank=local_rank, device_group=dist.group.WORLD,
                                 cpu_group=cpu_group,
                                 device=_HOST if backend == "gloo" or device is None else device)
    return _group


def destroy_tp_group() -> None:
    """Leave the group (every rank together); tears the default group down only if
    `init_tp_group` made it."""
    if dist.is_initialized():
        if _owns_default_group:
            dist.destroy_process_group()
        elif _group.cpu_group is not None:
            dist.destroy_process_group(_group.cpu_group)
    _forget()


def abort_tp_group() -> None:
    """Leave a group whose peers are dead or stuck: NCCL's communicator is aborted
    (destroying it would wait for them); gloo's sockets are simply closed."""
    if dist.is_initialized():
        if _group.cpu_group is not None:
            dist.destroy_process_group(_group.cpu_group)
        if _owns_default_group:
            if dist.get_backend() == dist.Backend.GLOO:
                dist.destroy_process_group()
            else:
                dist.distributed_c10d._abort_process_group()
    _forget()


def _forget() -> None:
    global _group, _owns_default_group
    _owns_default_group = False
    _group = _SINGLE_RANK
