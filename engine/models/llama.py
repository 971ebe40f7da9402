"""The LLaMA family: LLaMA, Mistral, Qwen2 and Qwen3 share one implementation.

Mistral computes exactly as LLaMA without biases, so it uses `LlamaForCausalLM`.
Attention always covers the whole context: a checkpoint with a sliding window
(`config.sliding_window`, e.g. Mistral-7B-v0.1) is exact up to that many tokens.

Pre-norm decoder with RMSNorm, rotary embeddings, grouped-query attention and a
SiLU-gated MLP. The members differ only in flags (`LlamaFlags`): biases on the
q/k/v and o projections and the MLP, and Qwen3's per-head RMSNorm of q and k
before the rotary embedding.

Parameters (H heads, KVH kv heads, D head size, I intermediate size):
`self_attn.qkv_proj.weight [(H + 2 * KVH) * D, hidden]` rows `[q | k | v]`,
`self_attn.o_proj.weight [hidden, H * D]`, `mlp.gate_up_proj.weight [2 * I, hidden]`
rows `[gate | up]`, `mlp.down_proj.weight [hidden, I]`. Checkpoint tensors keep
their HF names (`q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`) and are
copied into those parts.

Tensor parallelism (Megatron): qkv_proj and gate_up_proj are column-parallel,
o_proj and down_proj row-parallel, the embedding and LM head
vocabulary-parallel; H, KVH and I above are then this rank's share (kv heads
are replicated when there are fewer of them than ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.models.base import CausalLM, ParamPiece
from engine.models.layers import (PagedAttention, RMSNorm, RotaryEmbedding, activation,
                                  apply_rotary)
from engine.models.parallel_layers import (PackedLinear, RowParallelLinear, RowShard,
                                           VocabParallelEmbedding, shard_heads)
from platforms.interface import AttentionBackend

# HF projection name -> (our packed projection, its part)
_PACKED_PARTS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


@dataclass(frozen=True)
class LlamaFlags:
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


def head_size_of(config: Any) -> int:
    """`config.head_dim` when the config sets it, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, flags: LlamaFlags, backend: AttentionBackend):
        super().__init__()
        self.head_size = head_size_of(config)
        heads = shard_heads(config.num_attention_heads, config.num_key_value_heads,
                            self.head_size)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.qkv_sizes = [heads.q_rows.size, heads.kv_rows.size, heads.kv_rows.size]
        self.qkv_proj = PackedLinear(
            config.hidden_size, {"q": heads.q_rows, "k": heads.kv_rows, "v": heads.kv_rows},
            bias=flags.qkv_bias)
        self.o_proj = RowParallelLinear(heads.q_rows, config.hidden_size, bias=flags.o_bias)
        self.q_norm: Optional[RMSNorm] = None
        self.k_norm: Optional[RMSNorm] = None
        if flags.qk_norm:
            self.q_norm = RMSNorm(self.head_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_size, config.rms_norm_eps)
        self.attn = PagedAttention(backend, self.num_heads, self.num_kv_heads, self.head_size,
                                   scale=self.head_size ** -0.5)

    def qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`q [T, H, D]` and `k [T, KVH, D]` (QK-normed where the model has it, before
        rotary) and `v [T, KVH * D]` of `hidden [T, hidden_size]`: views of one packed
        projection."""
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_size)
        k = k.view(num_tokens, self.num_kv_heads, self.head_size)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv(hidden)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, flags: LlamaFlags):
        super().__init__()
        rows = RowShard.split(config.intermediate_size, "intermediate_size")
        self.gate_up_proj = PackedLinear(config.hidden_size, {"gate": rows, "up": rows},
                                         bias=flags.mlp_bias)
        self.down_proj = RowParallelLinear(rows, config.hidden_size, bias=flags.mlp_bias)
        self.act_fn = activation(config, "hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, flags: LlamaFlags, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, flags, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, flags)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, attn)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: Any, flags: LlamaFlags, backend: AttentionBackend):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, flags, backend)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """LLaMA 1/2/3 (also the default model, SmolLM2). See the module docstring."""

    def __init__(self, config: Any, attn_backend: AttentionBackend):
        super().__init__(config)
        self.model = LlamaModel(config, self.flags(config), attn_backend)
        self.lm_head = (None if self.tie_word_embeddings
                        else VocabParallelEmbedding(config.vocab_size, config.hidden_size))
        self.head_size = head_size_of(config)
        self.rotary = RotaryEmbedding(config, self.head_size)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = shard_heads(config.num_attention_heads, config.num_key_value_heads,
                                        self.head_size).num_kv_heads

    @staticmethod
    def flags(config: Any) -> LlamaFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaFlags(qkv_bias=bias, o_bias=bias,
                          mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=False)

    def input_embedding(self) -> VocabParallelEmbedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """`input_ids [T]`, `positions [T]` -> `hidden [T, hidden_size]` (final norm applied)."""
        self.check_kv_caches(kv_caches)
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            hidden = layer(hidden, cos, sin, kv_cache, attn)
        return self.model.norm(hidden)

    def checkpoint_to_params(self, name: str, tensor: torch.Tensor) -> list[ParamPiece]:
        # Old checkpoints saved the rotary buffer; tied ones may repeat the embedding.
        if name.endswith("rotary_emb.inv_freq") or (
                name == "lm_head.weight" and self.lm_head is None):
            return []
        module, _, leaf = name.rpartition(".")
        parent, _, proj = module.rpartition(".")
        if proj in _PACKED_PARTS:
            packed, part = _PACKED_PARTS[proj]
            return [(f"{parent}.{packed}.{leaf}", part, tensor)]
        return [(name, None, tensor)]


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: biases on q/k/v, none on o_proj."""

    @staticmethod
    def flags(config: Any) -> LlamaFlags:
        return LlamaFlags(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMSNorm of q and k before the rotary embedding."""

    @staticmethod
    def flags(config: Any) -> LlamaFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaFlags(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
