"""Native model implementations, looked up by the checkpoint's `config.architectures`.

Every class follows the engine API (`engine.models.base.CausalLM`):
`Model(config, attn_backend)`, `forward(input_ids [T], positions [T], attn,
kv_caches) -> hidden [T, hidden_size]`, `compute_logits(hidden) -> float32
logits`, `load_weights(iterable of (HF name, tensor))`, and the KV cache sizes
`num_layers`, `num_kv_heads`, `head_size`.
"""

from __future__ import annotations

from typing import Any

from engine.models.base import CausalLM
from engine.models.gpt2 import GPT2LMHeadModel, GPTBigCodeForCausalLM
from engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GPTBigCodeForCausalLM": GPTBigCodeForCausalLM,
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)


def get_model_class(hf_config: Any) -> type[CausalLM]:
    """The class for the first of `hf_config.architectures` that is supported."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for name in architectures:
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise ValueError(f"architectures {architectures} are not supported; supported "
                     f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")


__all__ = ["CausalLM", "SUPPORTED_ARCHITECTURES", "get_model_class"]
