"""The platform contract every vendor implements.

A `Platform` describes one kind of hardware (cpu, cuda, rocm, xpu); an
`AttentionBackend` is one PagedAttention implementation for it. Getting a
backend never needs the hardware, so a kernel is testable wherever it runs
(e.g. the Triton kernels in the interpreter); only the engine refuses a
platform whose `is_available()` is False.

Tensor layouts (the contract):

- KV cache: one tensor for K and one for V per layer, shaped by
  `AttentionBackend.kv_cache_shape`; the default (NHD) is
  `[num_blocks, block_size, num_kv_heads, head_size]`.
- `slot_mapping [num_tokens]` int64: slot = block_id * block_size + offset;
  -1 means "do not write this token".
- `query [num_tokens, num_heads, head_size]`, `key/value
  [num_tokens, num_kv_heads, head_size]`, packed over sequences.
- `block_tables [num_seqs, max_blocks]` int32 (unused entries may hold any
  value and must not be read), `seq_lens [num_seqs]` int32 = cached context
  + new tokens, `query_start_loc [num_seqs + 1]` int32 (cumulative query
  lengths, starting at 0).

Causality: the i-th of q new tokens of a sequence sits at position
seq_len - q + i and attends to the keys at positions <= its own. GQA/MQA
when num_heads > num_kv_heads (query head h reads KV head
h // (num_heads // num_kv_heads)).
"""

from __future__ import annotations

import abc
from typing import Any, Optional, Sequence

import torch


class AttentionBackend(abc.ABC):
    """One PagedAttention implementation (see the module docstring)."""

    #: short name, unique within its platform ("reference", "fast", "triton", ...)
    name: str = ""
    #: dtypes this kernel computes in; the conformance matrix skips the others
    supported_dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16)
    #: head sizes the kernel supports; None = any
    supported_head_sizes: Optional[Sequence[int]] = None
    #: block sizes the kernel supports; None = any
    supported_block_sizes: Optional[Sequence[int]] = None

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        """Shape of ONE of the K/V cache tensors. Default NHD layout."""
        return (num_blocks, block_size, num_kv_heads, head_size)

    @abc.abstractmethod
    def write_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store `key/value [num_tokens, num_kv_heads, head_size]` at `slot_mapping`."""

    @abc.abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor,
                slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                max_seq_len: Optional[int] = None,
                max_query_len: Optional[int] = None) -> torch.Tensor:
        """Write the new tokens' K/V (as `write_kv`), then attend.

        Returns `out [num_tokens, num_heads, head_size]` in `query.dtype`.
        `max_seq_len` / `max_query_len` are optional host-side hints (the
        engine knows them without a device sync); a backend must compute them
        itself when they are None.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Platform(abc.ABC):
    """One kind of hardware and the attention backends that run on it."""

    #: registry name: "cpu", "cuda", "rocm", "xpu"
    name: str = ""
    #: torch device type tensors live on ("cpu", "cuda", "xpu"; ROCm uses "cuda")
    device: str = "cpu"
    #: torch.distributed backend for tensor parallelism
    dist_backend: str = "gloo"

    @property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.float16, torch.bfloat16)

    def auto_dtype(self, checkpoint_dtype: Optional[torch.dtype]) -> torch.dtype:
        """The dtype `dtype="auto"` loads a checkpoint stored in `checkpoint_dtype` in.

        vLLM's rule for accelerators: keep a half-precision checkpoint's type
        and serve a float32 (or undeclared) one in bfloat16, since half
        precision halves the memory traffic decode is bound by.
        """
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16

    def fused_ops(self, dtype: torch.dtype) -> Optional[Any]:
        """Fused elementwise ops (`rms_norm`, `silu_and_mul`, `rotary_`, as
        engine.models.fused_forward describes) for models in `dtype`, or None:
        then the model's plain layers run. GPUs' runners bring their own."""
        return None

    @abc.abstractmethod
    def is_available(self) -> bool:
        """Whether the hardware (and its software stack) is present here."""

    def unavailable_reason(self) -> str:
        """Why `is_available()` is False, naming the missing hardware."""
        return f"platform {self.name!r} is not available on this machine"

    @abc.abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """(total_bytes, free_bytes) of the device memory the KV cache lives in."""

    @abc.abstractmethod
    def backend_names(self) -> list[str]:
        """Names of the attention backends, fastest (the default) first."""

    @abc.abstractmethod
    def _make_backend(self, name: str) -> AttentionBackend:
        """Build the backend called `name` (already validated)."""

    def attention_backend(self, name: Optional[str] = None) -> AttentionBackend:
        """The backend called `name`, or the platform's default (its fastest)."""
        names = self.backend_names()
        if name is None:
            name = names[0]
        if name not in names:
            raise ValueError(f"unknown attention backend {name!r} for platform "
                             f"{self.name!r}; known: {', '.join(names)}")
        return self._make_backend(name)

    def torch_device(self, index: int = 0) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        return torch.device(self.device, index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
