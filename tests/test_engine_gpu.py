"""`LLM(model, device="cuda")` on tiny models: HF's greedy tokens, with both attention backends.

- float32: the first 16 greedy tokens of each of 8 prompts equal HF
  `generate(do_sample=False)` (float32, eager attention, on the CPU), for the
  CUDA C++ ("cuda") and Triton ("triton") backends;
- bfloat16 (the GPU default dtype): the share of those tokens that agree with
  HF float32 is printed, and must stay above a loose bound;
- the fast path (decode CUDA graphs, fused kernels, greedy shortcut) picks
  the plain path's (`enforce_eager=True`) greedy tokens on a float32 model,
  with graphs really replayed, padded batch sizes included.

Only models whose head size both backends support (64, 128) are used.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphs
from engine.gpu_model_runner import GpuModelRunner
from tiny_models import hf_greedy_tokens, tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
MODELS = ["llama", "mistral", "qwen3", "gpt2"]
NUM_TOKENS = 16
TEXT_PROMPTS = ["The capital of France is", "def add(a, b):", "Hello, how are you",
                "Once upon a time there was"]
#: loose bound on bf16 vs fp32 token agreement (greedy paths diverge after one flip)
MIN_BF16_AGREEMENT = 0.5


def make_prompts(vocab_size: int) -> list:
    """4 text prompts and 4 token-id prompts of 1..60 tokens (8 in all)."""
    generator = torch.Generator().manual_seed(11)
    prompts: list = list(TEXT_PROMPTS)
    for length in (1, 9, 33, 60):
        prompts.append({"prompt_token_ids": torch.randint(
            4, vocab_size, (length,), generator=generator).tolist()})
    return prompts


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_factory):
    """name -> (model_dir, prompts, HF float32 greedy tokens per prompt), cached."""
    @functools.cache
    def reference(name: str):
        model_dir = tiny_model_factory(name)
        prompts = make_prompts(len(AutoTokenizer.from_pretrained(model_dir)))
        expected = hf_greedy_tokens(model_dir, prompts, [NUM_TOKENS] * len(prompts),
                                    ignore_eos=True)
        return str(model_dir), prompts, expected

    return reference


def generate(model_dir: str, prompts: list, **llm_kwargs) -> tuple[list[list[int]], LLM]:
    # 32 sequences: the start-up profile's 8192 tokens then reach position 255, the last
    # the tiny models' 256 positions hold.
    llm = LLM(model_dir, device="cuda", max_num_seqs=32, **llm_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], llm


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_greedy_equals_hf_generate(hf_greedy, backend, name):
    model_dir, prompts, expected = hf_greedy(name)
    tokens, llm = generate(model_dir, prompts, dtype="float32", attention_backend=backend)
    assert isinstance(llm.llm_engine.model_runner, GpuModelRunner)
    for i, (got, want) in enumerate(zip(tokens, expected)):
        assert got == want, f"prompt {i}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_by_default_agrees_with_hf_float32(hf_greedy, backend):
    agreements = []
    for name in ("llama", "mistral"):
        model_dir, prompts, expected = hf_greedy(name)
        tokens, llm = generate(model_dir, prompts, attention_backend=backend)
        assert llm.llm_engine.model_runner.dtype == torch.bfloat16
        matches = sum(a == b for got, want in zip(tokens, expected) for a, b in zip(got, want))
        agreements.append(matches / (len(prompts) * NUM_TOKENS))
        first = sum(got[0] == want[0] for got, want in zip(tokens, expected)) / len(prompts)
        print(f"bf16 vs HF fp32, {name}, backend {backend}: {agreements[-1]:.1%} of "
              f"{len(prompts)}x{NUM_TOKENS} tokens agree (first tokens {first:.0%})")
    assert min(agreements) >= MIN_BF16_AGREEMENT


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_equals_plain_path(hf_greedy, backend, monkeypatch):
    model_dir, prompts, _ = hf_greedy("llama")
    replayed = []
    replay = DecodeGraphs.replay

    def counted_replay(self, size):
        replayed.append(size)
        return replay(self, size)

    monkeypatch.setattr(DecodeGraphs, "replay", counted_replay)
    # 8 prompts run as one batch (graph size 8), 5 as a padded one (graph 8 again, 3 idle
    # rows), 1 alone (graph 1); the plain path sees the same batches.
    for batch in (prompts, prompts[:5], prompts[5:6]):
        plain, _ = generate(model_dir, batch, dtype="float32", attention_backend=backend,
                            enforce_eager=True)
        replayed.clear()
        fast, _ = generate(model_dir, batch, dtype="float32", attention_backend=backend)
        assert fast == plain
        assert len(replayed) >= NUM_TOKENS - 1 and max(replayed) == (1 if len(batch) == 1 else 8)
