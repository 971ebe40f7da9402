"""Native model implementations, looked up by the checkpoint's `config.architectures`.

Every class follows the engine API (`engine.models.base.CausalLM`):
`Model(config, attn_backend)`, `forward(input_ids [T], positions [T], attn,
kv_caches) -> hidden [T, hidden_size]`, `compute_logits(hidden) -> float32
logits`, `load_weights(iterable of (HF name, tensor))`, and the KV cache sizes
`num_layers`, `num_kv_heads`, `head_size`. Under tensor parallelism a model
built on a rank holds that rank's shard (`engine.models.parallel_layers`);
`num_kv_heads` is then the rank's share, the heads its KV cache holds.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.distributed.parallel_state import planned_tp_group
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


def check_tensor_parallel(hf_config: Any, tensor_parallel_size: int,
                          attn_backend: Any) -> None:
    """ValueError naming the field when the model cannot be split over that many ranks.

    Builds rank 0's shard on the meta device (no memory, no processes):
    exactly the checks loading runs, before any worker starts.
    """
    model_class = get_model_class(hf_config)
    with planned_tp_group(tensor_parallel_size), torch.device("meta"):
        model_class(hf_config, attn_backend)


__all__ = ["CausalLM", "SUPPORTED_ARCHITECTURES", "check_tensor_parallel", "get_model_class"]
