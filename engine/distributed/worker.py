"""Ranks 1..N-1: a shard of the model, the KV cache of its heads, and rank 0's steps.

A worker never schedules, samples or tokenizes. It resolves the model as
rank 0 does, loads its shard, sizes its KV cache together with the other
ranks, then loops: receive rank 0's step plan, run the same forward pass on
its shard (taking part in the all-reduces and the logits all-gather), wait
for the next. When rank 0 stops it, it answers the stop handshake and
leaves the group together with rank 0, then returns. On an error (rank 0
gone, a failed step) it raises without tearing the group down: NCCL's
teardown would wait for peers that are not coming, and the process's exit
frees everything anyway.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed.environment import torchrun_env
from engine.distributed.launcher import check_world_size, join_group
from engine.distributed.parallel_state import destroy_tp_group
from engine.distributed.step_channel import receive_step, stop_handshake
from engine.engine_setup import build_model_runner, resolve_model_setup

logger = logging.getLogger(__name__)


def is_torchrun_worker(config: EngineConfig) -> bool:
    """Whether this process is a rank > 0 of a torchrun-launched tensor-parallel engine."""
    launch = torchrun_env()
    return config.tensor_parallel_size > 1 and launch is not None and launch.rank != 0


def run_spawned_worker(config: EngineConfig, rank: int, store: dist.Store) -> None:
    """Rank `rank` of an engine that spawned it on this host (device index = rank)."""
    setup = resolve_model_setup(config)
    join_group(setup.platform, config.tensor_parallel_size, rank, rank, store)
    _serve(config, setup)


def run_torchrun_worker(config: EngineConfig) -> None:
    """This torchrun rank (> 0): join rank 0's group and serve it until it stops."""
    launch = torchrun_env()
    setup = resolve_model_setup(config)
    check_world_size(setup.platform, config.tensor_parallel_size)
    join_group(setup.platform, config.tensor_parallel_size, launch.rank, launch.local_rank,
               store=None)
    _serve(config, setup)


def _serve(config: EngineConfig, setup) -> None:
    runner = build_model_runner(config, setup)
    logger.info("tensor-parallel worker ready: %d KV blocks", runner.num_blocks)
    while (plan := receive_step()) is not None:
        if plan.arrays is not None and plan.arrays.decode_steps is not None:
            runner.execute_decode_steps(plan)
        else:
            runner.execute_plan(plan)
    stop_handshake()
    destroy_tp_group()
