"""What a tensor-parallel process reads from (and sets in) its environment.

- NVLink multicast stays off in every process the engine starts (NCCL's
  NVLS algorithms, PyTorch symmetric memory, NVSHMEM): on shared multi-GPU
  hosts a program using it can take the host's GPUs out of service. The
  values are defaults (`setdefault`): a user who exports them wins.
- Under `torchrun` the launcher describes this process in RANK, WORLD_SIZE,
  LOCAL_RANK and LOCAL_WORLD_SIZE; rank 0 drives the engine, the other ranks
  serve it.
- `Platform.dist_backend` names the collective library; torch calls ROCm's
  RCCL "nccl".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

_TORCH_BACKEND_NAMES = {"rccl": "nccl"}


def keep_multicast_off() -> None:
    """Set the multicast-off variables (unless already set); children inherit them."""
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)


def torch_backend(dist_backend: str) -> str:
    """The torch.distributed backend for a platform's `dist_backend` name."""
    return _TORCH_BACKEND_NAMES.get(dist_backend, dist_backend)


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_env() -> Optional[TorchrunEnv]:
    """This process's place in a `torchrun` launch, or None when not launched so."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    return TorchrunEnv(rank=int(os.environ["RANK"]), world_size=world_size,
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
