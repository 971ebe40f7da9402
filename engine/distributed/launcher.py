"""Start the tensor-parallel group of an engine: one process per device.

On one host the engine (rank 0) spawns ranks 1..N-1 with
torch.multiprocessing ("spawn": a fresh interpreter each, safe with CUDA)
and meets them at a TCPStore it opens on a free local port. Under `torchrun`
(one host or many) every rank already runs; they meet at the launcher's
MASTER_ADDR:MASTER_PORT. Either way each rank binds its device (LOCAL_RANK
on its host), joins the group through `Platform.dist_backend`, and only
rank 0 returns to the engine: the others serve its steps
(`engine.distributed.worker`).

Stopping (`TensorParallelWorkers.shutdown`, bounded in time whatever state
the workers are in): rank 0 sends the stop and waits, at most
STOP_HANDSHAKE_TIMEOUT, for every worker to answer; then all ranks tear the
group down together (NCCL's teardown waits on the peers, so rank 0 must not
first wait for the workers to exit), and rank 0 joins the processes it
started, terminating and then killing any that linger. Workers that do not
answer are killed first and the group aborted. It runs once, on the
engine's `shutdown()`, its garbage collection or interpreter exit, whichever
comes first: its exit hook is registered after the processes start, so it
runs before multiprocessing's own hook, which would SIGTERM the (daemonic)
workers and leave rank 0 tearing NCCL down against dead peers. A spawned
worker also exits at once if the engine process dies.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed.environment import keep_multicast_off, torch_backend, torchrun_env
from engine.distributed.parallel_state import (COLLECTIVE_TIMEOUT, TensorParallelGroup,
                                               abort_tp_group, destroy_tp_group, init_tp_group)
from engine.distributed.step_channel import send_stop, stop_handshake

logger = logging.getLogger(__name__)

_STORE_HOST = "127.0.0.1"
#: how long a stopped worker may take to exit, and then to die of SIGTERM
_EXIT_SECONDS = 10
_TERMINATE_SECONDS = 2


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
    stopped: bool = False

    def shutdown(self) -> None:
        """Stop the workers and leave the group with them; a no-op once done."""
        if self._finish():
            return
        try:
            send_stop()
            stop_handshake()
        except RuntimeError as err:  # a worker is gone, or stuck in a collective
            logger.warning("tensor-parallel workers did not answer the stop, killing "
                           "them: %s", err)
            self._kill()
            return
        destroy_tp_group()
        self._reap()

    def abort(self) -> None:
        """Kill the workers without a word (the engine failed to start)."""
        if not self._finish():
            self._kill()

    def _finish(self) -> bool:
        """Mark the workers stopped; whether they already were."""
        stopped, self.stopped = self.stopped, True
        atexit.unregister(self.shutdown)
        return stopped

    def _kill(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.join()
        self.processes = []
        abort_tp_group()

    def _reap(self) -> None:
        for process in self.processes:
            process.join(_EXIT_SECONDS)
            if process.is_alive():
                logger.warning("tensor-parallel worker %s did not exit within %d s: "
                               "terminating it", process.name, _EXIT_SECONDS)
                process.terminate()
                process.join(_TERMINATE_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
            if process.exitcode:
                logger.warning("tensor-parallel worker %s ended with exit code %s",
                               process.name, process.exitcode)
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
        workers = TensorParallelWorkers(join_group(platform, world_size, launch.rank,
                                                   launch.local_rank, store=None))
        atexit.register(workers.shutdown)
        return workers
    store = dist.TCPStore(_STORE_HOST, 0, world_size, is_master=True,
                          timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    context = mp.get_context("spawn")
    processes = [context.Process(target=_worker_process, name=f"pagedllm-tp-rank{rank}",
                                 args=(rank, store.port, config), daemon=True)
                 for rank in range(1, world_size)]
    for process in processes:
        process.start()
    workers = TensorParallelWorkers(TensorParallelGroup(), processes)
    atexit.register(workers.shutdown)
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

    _exit_with_parent()
    exit_code = 0
    try:
        store = dist.TCPStore(_STORE_HOST, store_port, config.tensor_parallel_size,
                              is_master=False, timeout=COLLECTIVE_TIMEOUT)
        run_spawned_worker(config, rank, store)
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip the interpreter's teardown: after an error the process group is
        # still up, and its destructor would wait for peers that are gone.
        os._exit(exit_code)


def _exit_with_parent() -> None:
    """Leave as soon as the engine process dies (killed, crashed): a worker waiting in a
    device collective would otherwise sit out NCCL's timeout."""
    sentinel = multiprocessing.parent_process().sentinel

    def wait_and_exit() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(1)

    threading.Thread(target=wait_and_exit, name="pagedllm-tp-parent-watch",
                     daemon=True).start()
