"""Start the tensor-parallel group of an engine: one process per device.

On one host the engine (rank 0) spawns ranks 1..N-1 with
torch.multiprocessing ("spawn": a fresh interpreter each, safe with CUDA)
and meets them at a TCPStore it opens on a free local port. Under `torchrun`
(one host or many) every rank already runs; they meet at the launcher's
MASTER_ADDR:MASTER_PORT. Either way each rank binds its device (LOCAL_RANK
on its host), joins the group through `Platform.dist_backend`, and only
rank 0 returns to the engine: the others serve its steps
(`engine.distributed.worker`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed.environment import keep_multicast_off, torch_backend, torchrun_env
from engine.distributed.parallel_state import (COLLECTIVE_TIMEOUT, TensorParallelGroup,
                                               destroy_tp_group, init_tp_group)
from engine.distributed.step_channel import send_stop

logger = logging.getLogger(__name__)

_STORE_HOST = "127.0.0.1"
_JOIN_SECONDS = 60


def check_world_size(platform: Any, tensor_parallel_size: int) -> None:
    """ValueError when this host lacks the devices, or torchrun started another number."""
    launch = torchrun_env()
    if launch is not None and tensor_parallel_size > 1 \
            and launch.world_size != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} differs from "
                         f"torchrun's WORLD_SIZE={launch.world_size}")
    if platform.device == "cpu":
        return
    ranks_here = launch.local_world_size if launch is not None and tensor_parallel_size > 1 \
        else tensor_parallel_size
    present = getattr(torch, platform.device).device_count()
    if ranks_here > present:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs {ranks_here} "
                         f"{platform.name} devices on this host, {present} present")


def join_group(platform: Any, world_size: int, rank: int, local_rank: int,
               store: Optional[dist.Store]) -> TensorParallelGroup:
    """Bind this rank's device and join the group (`store=None`: torchrun's env)."""
    keep_multicast_off()
    device = platform.torch_device(local_rank)
    if device.type != "cpu":
        getattr(torch, device.type).set_device(device)
    backend = torch_backend(platform.dist_backend)
    return init_tp_group(backend, world_size, rank, local_rank, store=store, device=device)


@dataclass
class TensorParallelWorkers:
    """Rank 0's handle on the other ranks: stops them when the engine shuts down."""
    group: TensorParallelGroup
    processes: list[BaseProcess] = field(default_factory=list)

    def shutdown(self) -> None:
        """Tell the workers to exit, wait for the ones this process started, leave."""
        try:
            send_stop()
        except RuntimeError as err:  # a worker already gone: nothing left to tell
            logger.warning("stopping tensor-parallel workers: %s", err)
        self._reap(timeout=_JOIN_SECONDS)
        destroy_tp_group()

    def abort(self) -> None:
        """Kill the workers without a word (the engine failed to start)."""
        for process in self.processes:
            process.kill()
        self._reap(timeout=_JOIN_SECONDS)
        destroy_tp_group()

    def _reap(self, timeout: float) -> None:
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes = []


def start_workers(platform: Any, config: Any) -> TensorParallelWorkers:
    """Make this process rank 0 of a `config.tensor_parallel_size` group.

    `config` (an EngineConfig with `model` resolved to a local directory)
    travels to the spawned ranks, which build their shards from it.
    """
    world_size = config.tensor_parallel_size
    keep_multicast_off()
    launch = torchrun_env()
    if launch is not None:
        return TensorParallelWorkers(join_group(platform, world_size, launch.rank,
                                                launch.local_rank, store=None))
    store = dist.TCPStore(_STORE_HOST, 0, world_size, is_master=True,
                          timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    context = mp.get_context("spawn")
    processes = [context.Process(target=_worker_process, name=f"pagedllm-tp-rank{rank}",
                                 args=(rank, store.port, config), daemon=True)
                 for rank in range(1, world_size)]
    for process in processes:
        process.start()
    workers = TensorParallelWorkers(TensorParallelGroup(), processes)
    try:
        workers.group = join_group(platform, world_size, 0, 0, store)
    except BaseException:
        workers.abort()
        raise
    return workers


def _worker_process(rank: int, store_port: int, config: Any) -> None:
    # Imported in the child only: the worker builds its shard through the
    # engine setup, which imports this module.
    from engine.distributed.worker import run_spawned_worker

    store = dist.TCPStore(_STORE_HOST, store_port, config.tensor_parallel_size,
                          is_master=False, timeout=COLLECTIVE_TIMEOUT)
    run_spawned_worker(config, rank, store)
