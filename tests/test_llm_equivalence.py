"""`LLM.generate` greedy output equals HF `generate(do_sample=False)`, token for token.

Every tiny architecture (tests/tiny_models.py, float32, CPU) gets one batch
of 16+ prompts of mixed lengths (text and token-id prompts, some sharing a
long prefix, each with its own max_tokens) in ONE generate call, under every
engine configuration that changes how the work is cut up: prefix caching on
and off, a KV pool so small that requests get preempted and recomputed,
chunked prefill (32-token steps), block sizes 8 and 32. The KV pool starts
filled with NaN. The HF reference generates each prompt alone, without padding.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from cpu_threads import single_torch_thread  # noqa: F401
from tiny_models import TINY_MODELS, hf_greedy_tokens, tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TEXT_PROMPTS = [
    "The capital of France is",
    "Hello, how are you",
    "def add(a, b):",
    "Once upon a time there was a small language model that liked to count: 1 2 3",
]
NUM_TOKEN_PROMPTS = 14
SHARED_PREFIX_LEN = 40

#: engine variant -> (LLM keyword arguments, what must be observed while running)
VARIANTS = {
    # 4 sequences at a time: later prompts find the shared prefix already cached.
    "prefix-caching": (dict(enable_prefix_caching=True, max_num_seqs=4), "prefix_hits"),
    "no-prefix-caching": (dict(enable_prefix_caching=False, max_num_seqs=4), "no_prefix_hits"),
    "preemption": (dict(num_gpu_blocks_override=12), "preemptions"),
    "chunked-prefill": (dict(max_num_batched_tokens=32), "chunked_prefill"),
    "block-size-8": (dict(block_size=8), None),
    "block-size-32": (dict(block_size=32), None),
}


def make_prompts(vocab_size: int, seed: int) -> tuple[list, list[SamplingParams]]:
    """Text prompts plus token-id prompts of 1..70 tokens, half of them on one shared prefix."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(4, vocab_size, (SHARED_PREFIX_LEN,), generator=generator).tolist()
    prompts: list = list(TEXT_PROMPTS)
    for i in range(NUM_TOKEN_PROMPTS):
        length = int(torch.randint(1, 31, (), generator=generator))
        tail = torch.randint(4, vocab_size, (length,), generator=generator).tolist()
        prompts.append({"prompt_token_ids": prefix + tail if i % 2 else tail})
    max_tokens = torch.randint(4, 17, (len(prompts),), generator=generator).tolist()
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens]
    return prompts, params


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_factory):
    """name -> (model_dir, prompts, params, HF's greedy output ids per prompt), cached."""
    @functools.cache
    def reference(name: str):
        model_dir = tiny_model_factory(name)
        prompts, params = make_prompts(len(AutoTokenizer.from_pretrained(model_dir)),
                                       seed=len(name))
        expected = hf_greedy_tokens(model_dir, prompts, [p.max_tokens for p in params])
        return model_dir, prompts, params, expected

    return reference


def check_observed(llm: LLM, observed: str | None, prompts) -> None:
    """The variant really exercised what it is named after."""
    engine = llm.llm_engine
    if observed == "prefix_hits":
        assert engine.kv_cache_manager.prefix_cache_hits > 0
    elif observed == "no_prefix_hits":
        assert engine.kv_cache_manager.prefix_cache_hits == 0
    elif observed == "preemptions":
        assert engine.num_preemptions > 0
    elif observed == "chunked_prefill":
        assert max(len(p["prompt_token_ids"]) for p in prompts if isinstance(p, dict)) > 32


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_greedy_equals_hf_generate(hf_greedy, name, variant):
    model_dir, prompts, params, expected = hf_greedy(name)
    engine_kwargs, observed = VARIANTS[variant]
    llm = LLM(model=str(model_dir), device="cpu", dtype="float32", **engine_kwargs)
    # The pool starts uninitialized: no slot may be read before it is written.
    for key_cache, value_cache in llm.llm_engine.model_runner.kv_caches:
        key_cache.fill_(float("nan"))
        value_cache.fill_(float("nan"))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == len(prompts) >= 16
    for i, (output, want) in enumerate(zip(outputs, expected)):
        got = output.outputs[0].token_ids
        assert got == want, f"prompt {i} ({len(output.prompt_token_ids)} tokens)"
        assert output.finished
    check_observed(llm, observed, prompts)
