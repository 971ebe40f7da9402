"""Tiny random-weight Hugging Face checkpoints of every supported architecture.

No model can be downloaded here, so tests build their own: a byte-level BPE
tokenizer trained locally (bos `<s>`, eos `</s>`, a ChatML-style chat template)
and, per entry of `TINY_MODELS`, a 2-layer model saved with `save_pretrained`
(config.json + model.safetensors) next to the tokenizer files, so both
`AutoTokenizer.from_pretrained(dir)` and `AutoModelForCausalLM.from_pretrained(dir)`
work on the directory.

Weights are redrawn so activations stay O(1) (HF's 0.02-std init makes attention
nearly uniform, which would hide rotary or masking bugs) and norms and biases are
non-trivial (so a weight that fails to load changes the output).

Plain functions: `build_tokenizer()`, `build_tiny_model(out_dir, name)`,
`hf_reference_model(model_dir)`, `hf_greedy_tokens(model_dir, prompts, max_tokens)`.
Pytest fixtures (import them into a test module,
`from tiny_models import tiny_model_factory`, tests/ being on sys.path, or list
this module in a conftest's `pytest_plugins`): `tiny_model_factory`
(session-scoped: name -> directory, each built once) and `tiny_model`
(parametrized over all of `TINY_MODELS`: `(name, directory)`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTBigCodeConfig, LlamaConfig,
                          MistralConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen3Config)
from transformers.pytorch_utils import Conv1D

BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOKENIZER_VOCAB_SIZE = 400

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello, how are you today? I am fine, thank you very much.",
    "PagedAttention stores the key and value cache in fixed-size blocks.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small language model that liked to count: 1 2 3 4 5.",
    "The quick brown fox jumps over the lazy dog.",
    "user: what is two plus two? assistant: two plus two is four.",
]

_LAYERS = 2


def _llama(**common) -> PretrainedConfig:
    return LlamaConfig(
        **common, hidden_size=64, intermediate_size=128, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, attention_bias=True,
        mlp_bias=True, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})


def _llama_mqa(**common) -> PretrainedConfig:
    return LlamaConfig(
        **common, hidden_size=64, intermediate_size=96, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0})


def _mistral(**common) -> PretrainedConfig:
    return MistralConfig(
        **common, hidden_size=64, intermediate_size=128, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128,
        max_position_embeddings=256, tie_word_embeddings=False)


def _qwen2(**common) -> PretrainedConfig:
    return Qwen2Config(
        **common, hidden_size=64, intermediate_size=128, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                         "original_max_position_embeddings": 64})


def _qwen3(**common) -> PretrainedConfig:
    return Qwen3Config(
        **common, hidden_size=64, intermediate_size=128, num_hidden_layers=_LAYERS,
        num_attention_heads=4, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=256, tie_word_embeddings=False)


def _gpt2(**common) -> PretrainedConfig:
    return GPT2Config(**common, n_embd=128, n_head=2, n_layer=_LAYERS, n_positions=256,
                      scale_attn_by_inverse_layer_idx=True)


def _gpt_bigcode(**common) -> PretrainedConfig:
    return GPTBigCodeConfig(**common, n_embd=64, n_head=4, n_layer=_LAYERS,
                            n_positions=256, multi_query=True, tie_word_embeddings=False)


def _gpt_bigcode_mha(**common) -> PretrainedConfig:
    return GPTBigCodeConfig(**common, n_embd=64, n_head=4, n_layer=_LAYERS,
                            n_positions=256, multi_query=False)


#: name -> (config factory taking the vocab size and special token ids, what it covers)
TINY_MODELS: dict[str, tuple[Callable[..., PretrainedConfig], str]] = {
    "llama": (_llama, "GQA 4/2, head_dim 64 set explicitly, all biases, llama3 rope, untied"),
    "llama-mqa": (_llama_mqa, "MQA 4/1, head_dim 16, linear rope scaling, tied"),
    "mistral": (_mistral, "GQA 4/2, head_dim 128, untied"),
    "qwen2": (_qwen2, "GQA 4/2, q/k/v biases, yarn rope (scaled cos/sin), tied"),
    "qwen3": (_qwen3, "MQA 4/1, head_dim 128, q/k norm, untied"),
    "gpt2": (_gpt2, "MHA 2 heads, head_dim 64, scale by inverse layer index, tied"),
    "gpt_bigcode": (_gpt_bigcode, "MQA 4 heads, head_dim 16, untied"),
    "gpt_bigcode-mha": (_gpt_bigcode_mha, "MHA 4 heads (per-head fused c_attn), tied"),
}


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE,
                                  special_tokens=[BOS, EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return tokenizer.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer (same vocabulary every call): adds `<s>`, eos `</s>`."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()), bos_token=BOS,
        eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE)


def _redraw_weights(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    conv1d_weights = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                # norm weights around 1, biases around 0: both must load to matter
                is_norm_weight = bool((param == 1).all())
                param.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.2 * noise)
            else:
                fan_in = param.shape[0] if id(param) in conv1d_weights else param.shape[1]
                param.copy_(noise * fan_in ** -0.5)


def build_tiny_model(out_dir: str | Path, name: str, seed: int = 0) -> Path:
    """Save tiny model `name` (a key of TINY_MODELS) and the tokenizer into `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = TINY_MODELS[name][0](
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _redraw_weights(model, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def hf_reference_model(model_dir: str | Path) -> torch.nn.Module:
    """The transformers model of `model_dir` in float32 with eager attention (the oracle)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


def hf_greedy_tokens(model_dir: str | Path, prompts: Sequence[str | dict],
                     max_tokens: Sequence[int], ignore_eos: bool = False) -> list[list[int]]:
    """HF `generate(do_sample=False)`'s output ids for each prompt (text, or a dict with
    "prompt_token_ids"), generated alone and unpadded by `hf_reference_model`; with
    `ignore_eos`, exactly max_tokens ids each."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = hf_reference_model(model_dir)
    outputs = []
    for prompt, num_tokens in zip(prompts, max_tokens, strict=True):
        ids = torch.tensor([tokenizer.encode(prompt) if isinstance(prompt, str)
                            else prompt["prompt_token_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=num_tokens,
                                 min_new_tokens=num_tokens if ignore_eos else None,
                                 pad_token_id=tokenizer.pad_token_id)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[[str], Path]:
    """`factory(name) -> directory` of tiny model `name`, built once per session."""
    built: dict[str, Path] = {}

    def factory(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(tmp_path_factory.mktemp(name), name)
        return built[name]

    return factory


@pytest.fixture(params=list(TINY_MODELS))
def tiny_model(request, tiny_model_factory) -> tuple[str, Path]:
    """`(name, directory)` for every tiny model in turn."""
    return request.param, tiny_model_factory(request.param)
