"""EngineConfig: every knob of one engine instance, validated up front.

Fields keep vLLM's names so `LLM(...)` keyword arguments carry over. Values
that depend on the model (max_model_len, max_num_batched_tokens) may be None
here; `resolve_model_limits` fills them once the HF config is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_CPU_KV_CACHE_MEMORY = 2 << 30


@dataclass
class EngineConfig:
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    block_size: int = 16
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory: Optional[int] = None
    attention_backend: Optional[str] = None
    #: ranks the model is split over (docs/distributed.md); 1 = no tensor parallelism
    tensor_parallel_size: int = 1
    #: on a GPU, run the plain PyTorch path (no CUDA graphs, no fused kernels)
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        _require_positive("block_size", self.block_size)
        _require_positive("max_num_seqs", self.max_num_seqs)
        _require_positive("tensor_parallel_size", self.tensor_parallel_size)
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        for name in ("max_model_len", "max_num_batched_tokens", "num_gpu_blocks_override",
                     "kv_cache_memory"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization!r}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError("num_gpu_blocks_override must be >= 2, got "
                             f"{self.num_gpu_blocks_override}")

    def resolve_model_limits(self, model_max_len: Optional[int]) -> None:
        """Fill max_model_len / max_num_batched_tokens from the model's context length."""
        if model_max_len is not None and self.max_model_len is not None \
                and self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"context length {model_max_len}")
        if self.max_model_len is None:
            self.max_model_len = model_max_len or 2048
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(DEFAULT_MAX_NUM_BATCHED_TOKENS,
                                              self.max_num_seqs)


def _require_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
