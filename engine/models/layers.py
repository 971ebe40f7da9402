"""Building blocks shared by the native models: norms, rotary, attention, activations.

Every activation is packed over the sequences of a step: `hidden [T, hidden_size]`
with T the number of new tokens (no padding, no batch dimension).

The linear layers and embeddings live in `engine.models.parallel_layers`:
packed projections stack several logical projections along the output
dimension so one GEMM computes them all, e.g. `qkv_proj.weight
[(H + 2 * KVH) * D, hidden]` = rows `[q (H*D) | k (KVH*D) | v (KVH*D)]` and
`gate_up_proj.weight [2 * I, hidden]` = rows `[gate (I) | up (I)]`; under
tensor parallelism each rank holds its slice of every part (whole heads),
so the same layout holds per rank with the local H, KVH and I.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from platforms.interface import AttentionBackend

# Rope types whose frequencies transformers computes from the config alone
# (static in the position); "dynamic" and "longrope" change with the sequence
# length and are not supported.
_STATIC_ROPE_TYPES = ("linear", "llama3", "yarn")


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), normalized in float32 and cast back first (as HF)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings as transformers 5.x stores them (`config.rope_parameters`).

    transformers 4.x kept `rope_theta` and `rope_scaling` apart; both are merged
    into one dict so the rest of the code reads a single format.
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(config: Any, head_size: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_size // 2] float32, attention_scaling of cos/sin)."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        exponents = torch.arange(0, head_size, 2, dtype=torch.int64).float()
        return 1.0 / (params["rope_theta"] ** (exponents / head_size)), 1.0
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported; "
                         f"supported: default, {', '.join(_STATIC_ROPE_TYPES)}")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding:
    """Rotate-half (GPT-NeoX style) rotary embedding computed from positions.

    Not a module: it holds no weights, and `inv_freq` is a plain tensor so that
    building the model on the meta device and materializing it never clears it.
    """

    def __init__(self, config: Any, head_size: int):
        # Computed on the CPU even while the model is built on the meta device.
        with torch.device("cpu"):
            self.inv_freq, self.attention_scaling = rope_inv_freq(config, head_size)

    def cos_sin(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`positions [T]` -> (cos, sin), each `[T, head_size]` in `dtype`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [T, heads, head_size]` by `cos/sin [T, head_size]`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class PagedAttention(nn.Module):
    """Calls the platform's attention backend for one layer; holds no weights.

    Takes `query [T, H * D]`, `key/value [T, KVH * D]` (or already split into
    heads) and returns `[T, H * D]`; the new keys/values are written into the
    layer's `(key_cache, value_cache)` by the backend.
    """

    def __init__(self, backend: AttentionBackend, num_heads: int, num_kv_heads: int,
                 head_size: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        self.backend = backend
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMetadata) -> torch.Tensor:
        num_tokens = query.shape[0]
        out = self.backend.forward(
            query.view(num_tokens, self.num_heads, self.head_size),
            key.view(num_tokens, self.num_kv_heads, self.head_size),
            value.view(num_tokens, self.num_kv_heads, self.head_size),
            kv_cache[0], kv_cache[1], attn.slot_mapping, attn.block_tables,
            attn.seq_lens, attn.query_start_loc, self.scale,
            max_seq_len=attn.max_seq_len, max_query_len=attn.max_query_len)
        return out.reshape(num_tokens, self.num_heads * self.head_size)


def activation(config: Any, field: str) -> nn.Module:
    """The activation the config names in `field` ("silu", "gelu_new", ...), as HF runs it."""
    from transformers.activations import ACT2FN
    name = getattr(config, field)
    if name not in ACT2FN:
        raise ValueError(f"{field} {name!r} is not a known activation")
    return ACT2FN[name]
