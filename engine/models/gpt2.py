"""GPT-2 and GPT BigCode (StarCoder, SantaCoder): one implementation.

Pre-norm decoder with LayerNorm, learned absolute position embeddings, a fused
q/k/v projection with biases and a GELU MLP. BigCode adds multi-query attention
(`config.multi_query`: one kv head) and stores nn.Linear weights, where GPT-2
stores Conv1D weights transposed (`[in, out]`).

Parameters (E hidden size, H heads, KVH kv heads, D = E / H):
`attn.c_attn.weight [E + 2 * KVH * D, E]` rows `[q | k | v]` (each part head-major),
`attn.c_proj.weight [E, E]`, `mlp.c_fc.weight [inner, E]`, `mlp.c_proj.weight [E, inner]`.
GPT-2's Conv1D tensors are transposed on load, and BigCode's multi-head c_attn
(stored per head as `[q_h | k_h | v_h]`) is regrouped into that layout.

Tensor parallelism (Megatron): c_attn and mlp.c_fc are column-parallel (whole
heads per rank; BigCode's single kv head is replicated), the two c_proj
row-parallel, wte and the LM head vocabulary-parallel, wpe replicated; the
shapes above are then this rank's share.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.models.base import CausalLM, ParamPiece
from engine.models.layers import PagedAttention, activation
from engine.models.parallel_layers import (ColumnParallelLinear, PackedLinear,
                                           RowParallelLinear, RowShard,
                                           VocabParallelEmbedding, shard_heads)
from platforms.interface import AttentionBackend

_CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")


class GPT2Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, num_kv_heads: int,
                 backend: AttentionBackend):
        super().__init__()
        hidden_size, num_heads = config.hidden_size, config.num_attention_heads
        head_size = hidden_size // num_heads
        heads = shard_heads(num_heads, num_kv_heads, head_size)
        self.qkv_sizes = [heads.q_rows.size, heads.kv_rows.size, heads.kv_rows.size]
        self.c_attn = PackedLinear(
            hidden_size, {"q": heads.q_rows, "k": heads.kv_rows, "v": heads.kv_rows}, bias=True)
        self.c_proj = RowParallelLinear(heads.q_rows, hidden_size, bias=True)
        scale = head_size ** -0.5 if config.scale_attn_weights else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = PagedAttention(backend, heads.num_heads, heads.num_kv_heads, head_size, scale)

    def forward(self, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).split(self.qkv_sizes, dim=-1)
        return self.c_proj(self.attn(q, k, v, kv_cache, attn))


class GPT2MLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        rows = RowShard.split(getattr(config, "n_inner", None) or 4 * config.hidden_size,
                              "n_inner")
        self.c_fc = ColumnParallelLinear(config.hidden_size, rows, bias=True)
        self.c_proj = RowParallelLinear(rows, config.hidden_size, bias=True)
        self.act = activation(config, "activation_function")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int, num_kv_heads: int,
                 backend: AttentionBackend):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx, num_kv_heads, backend)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), kv_cache, attn)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config: Any, num_kv_heads: int, backend: AttentionBackend):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i, num_kv_heads, backend)
                               for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 (multi-head attention, Conv1D checkpoint weights)."""

    #: whether checkpoint projection weights are Conv1D `[in, out]`
    conv1d_weights = True

    def __init__(self, config: Any, attn_backend: AttentionBackend):
        super().__init__(config)
        self.num_layers = config.num_hidden_layers
        self.head_size = config.hidden_size // config.num_attention_heads
        self.transformer = GPT2Model(config, self.kv_heads(config), attn_backend)
        self.num_kv_heads = shard_heads(config.num_attention_heads, self.kv_heads(config),
                                        self.head_size).num_kv_heads
        self.lm_head = (None if self.tie_word_embeddings
                        else VocabParallelEmbedding(config.vocab_size, config.hidden_size))

    @staticmethod
    def kv_heads(config: Any) -> int:
        return config.num_attention_heads

    def input_embedding(self) -> VocabParallelEmbedding:
        return self.transformer.wte

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """`input_ids [T]`, `positions [T]` -> `hidden [T, hidden_size]` (ln_f applied)."""
        self.check_kv_caches(kv_caches)
        hidden = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block, kv_cache in zip(self.transformer.h, kv_caches):
            hidden = block(hidden, kv_cache, attn)
        return self.transformer.ln_f(hidden)

    def split_qkv(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A whole checkpoint c_attn weight `[q+k+v, E]` or bias -> its q, k, v parts."""
        kv_size = self.kv_heads(self.config) * self.head_size
        return tensor.split([self.config.hidden_size, kv_size, kv_size], dim=0)

    def checkpoint_to_params(self, name: str, tensor: torch.Tensor) -> list[ParamPiece]:
        # The original GPT-2 checkpoints name the body without "transformer.".
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        module, _, leaf = name.rpartition(".")
        module_kind = module.rpartition(".")[2]
        # attn.bias / attn.masked_bias are saved causal-mask buffers, not weights.
        if (module_kind == "attn" and leaf in ("bias", "masked_bias")) or (
                name == "lm_head.weight" and self.lm_head is None):
            return []
        if self.conv1d_weights and leaf == "weight" and module_kind in _CONV1D_MODULES:
            tensor = tensor.t()
        if module_kind == "c_attn":
            return [(name, part, piece) for part, piece in zip("qkv", self.split_qkv(tensor))]
        return [(name, None, tensor)]


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    """GPT BigCode: multi-query attention when `config.multi_query`, nn.Linear weights."""

    conv1d_weights = False

    @staticmethod
    def kv_heads(config: Any) -> int:
        return 1 if config.multi_query else config.num_attention_heads

    def split_qkv(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.config.multi_query:
            return super().split_qkv(tensor)
        # Multi-head BigCode stores c_attn per head: [H, (q | k | v), D, ...].
        num_heads, rest = self.config.num_attention_heads, tensor.shape[1:]
        per_head = tensor.view(num_heads, 3, self.head_size, *rest)
        return per_head.transpose(0, 1).reshape(3, num_heads * self.head_size, *rest).unbind(0)
