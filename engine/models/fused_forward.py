"""`LlamaForCausalLM.forward` built from fused elementwise ops.

The plain layers (engine.models.layers, llama.py) run 5-10 small ops for each
RMSNorm, rotary embedding and SiLU gate. `fused_llama_forward(model,
max_positions, ops)` runs one fused op for each instead, from `ops`: any
object with

- `rms_norm(x, weight, eps, residual=None)`: with `residual`, first
  `residual <- x + residual` (in place), then the norm of the new residual;
- `silu_and_mul(gate_up [T, 2I]) -> [T, I]`;
- `rotary_(q [T, H, D], k [T, KVH, D], positions [T], cos, sin)`: rotate-half
  rotary embedding in place (q and k may be strided views of the packed qkv),

each rounding to the model dtype where the plain layers do:
engine.models.fused (Triton, GPUs) and the platform's `fused_ops` (the CPU's
compiled ones). It returns None for models it does not cover (non-LLaMA,
non-SiLU MLPs). Under tensor parallelism the modules are the rank's shards:
the ops see the rank's heads and intermediate slice, and the parallel layers
(vocabulary-parallel embedding, row-parallel o_proj and down_proj) do their
own all-reduces.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from engine.attention_metadata import AttentionMetadata
from engine.models.llama import LlamaForCausalLM

ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, list], torch.Tensor]


class FusedLlamaForward:
    """`LlamaForCausalLM.forward` with the fused ops; the weights stay the model's.

    Same signature and result: `(input_ids [T], positions [T], attn, kv_caches) ->
    hidden [T, hidden_size]` with the final norm applied. The rotary tables
    `cos/sin [max_positions, head_size]` are the model's own values, computed once.
    """

    def __init__(self, model: LlamaForCausalLM, max_positions: int, ops: Any):
        self.model = model
        self.ops = ops
        device = model.model.embed_tokens.weight.device
        dtype = model.model.embed_tokens.weight.dtype
        self.cos, self.sin = model.rotary.cos_sin(
            torch.arange(max_positions, device=device), dtype)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn: AttentionMetadata, kv_caches: list) -> torch.Tensor:
        model = self.model
        model.check_kv_caches(kv_caches)
        residual = model.model.embed_tokens(input_ids)
        hidden = None
        for layer, kv_cache in zip(model.model.layers, kv_caches):
            norm = layer.input_layernorm
            x = self.ops.rms_norm(residual if hidden is None else hidden, norm.weight,
                                  norm.eps, None if hidden is None else residual)
            hidden = self._attention(layer.self_attn, x, positions, kv_cache, attn)
            norm = layer.post_attention_layernorm
            x = self.ops.rms_norm(hidden, norm.weight, norm.eps, residual)
            mlp = layer.mlp
            hidden = mlp.down_proj(self.ops.silu_and_mul(mlp.gate_up_proj(x)))
        norm = model.model.norm
        return self.ops.rms_norm(hidden, norm.weight, norm.eps, residual)

    def _attention(self, attention, x: torch.Tensor, positions: torch.Tensor,
                   kv_cache, attn: AttentionMetadata) -> torch.Tensor:
        q, k, v = attention.qkv(x)
        self.ops.rotary_(q, k, positions, self.cos, self.sin)
        return attention.o_proj(attention.attn(q, k, v, kv_cache, attn))


def fused_llama_forward(model: torch.nn.Module, max_positions: int,
                        ops: Any) -> Optional[ForwardFn]:
    """A FusedLlamaForward of `ops` for `model`, or None where the plain forward must run."""
    if not isinstance(model, LlamaForCausalLM):
        return None
    if getattr(model.config, "hidden_act", None) != "silu":
        return None
    return FusedLlamaForward(model, max_positions, ops)
