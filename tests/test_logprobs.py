"""Sample and prompt logprobs equal log_softmax of HF's float32 logits (atol 1e-4).

For each generated token: its logprob and rank, and the top-k (ids, logprobs, ranks 1..k);
cumulative_logprob is their sum. For the prompt: position 0 is None, position i scores
prompt token i with the top-k of the logits after token i - 1. Checked with the prompt in one
step, in 16-token chunks, and after the prompt's blocks are in the prefix cache (a request
asking for prompt logprobs must not skip prompt tokens through it), under preemption, with
n = 1 and n = 2.
"""

from __future__ import annotations

import pytest
import torch

from cpu_threads import single_torch_thread  # noqa: F401
from engine import LLM, SamplingParams
from tiny_models import hf_reference_model, tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ATOL = 1e-4
PROMPTS = ["The capital of France is", {"prompt_token_ids": list(range(30, 71))}]

VARIANTS = {
    "one-step": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "prefix-cached": dict(),
    # requests preempted mid-prompt recompute chunks whose logprobs are already known
    "preemption": dict(max_num_batched_tokens=16, num_gpu_blocks_override=7),
}


def hf_log_softmax(hf_model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), V]: row i is the log-distribution of the token after token i."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0].float()
    return logits.log_softmax(-1)


def check_position(position, token_id: int, reference: torch.Tensor, num_logprobs: int):
    """One position's dict against HF's log-distribution `reference` [V]."""
    assert token_id in position
    chosen = position[token_id]
    assert chosen.logprob == pytest.approx(float(reference[token_id]), abs=ATOL)
    # the rank counts tokens at least as likely; tokens within ATOL may fall either way
    surely_ahead = int((reference > reference[token_id] + ATOL).sum())
    maybe_ahead = int((reference >= reference[token_id] - ATOL).sum())
    assert surely_ahead + 1 <= chosen.rank <= maybe_ahead
    top = sorted((lp.rank, tid, lp.logprob) for tid, lp in position.items()
                 if lp.rank <= num_logprobs and (tid != token_id or chosen.rank <= num_logprobs))
    assert [rank for rank, _, _ in top] == list(range(1, num_logprobs + 1))
    assert len(position) in (num_logprobs, num_logprobs + 1)
    hf_top = reference.topk(num_logprobs).values.tolist() if num_logprobs else []
    assert [lp for _, _, lp in top] == pytest.approx(hf_top, abs=ATOL)
    assert [lp for _, _, lp in top] == pytest.approx(
        [float(reference[tid]) for _, tid, _ in top], abs=ATOL)
    assert all(lp.decoded_token is not None for lp in position.values())


@pytest.fixture(scope="module")
def references(tiny_model_factory):
    models = {}

    def hf_model(name):
        if name not in models:
            models[name] = hf_reference_model(tiny_model_factory(name))
        return models[name]

    return hf_model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n, temperature, num_logprobs, num_prompt_logprobs", [
    (1, 0.0, 5, 3), (1, 0.9, 0, 0), (2, 0.9, 3, 1)])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_logprobs_equal_hf_log_softmax(tiny_model_factory, references, name, n, temperature,
                                       num_logprobs, num_prompt_logprobs, variant):
    llm = LLM(model=str(tiny_model_factory(name)), device="cpu", dtype="float32",
              block_size=8, **VARIANTS[variant])
    kv = llm.llm_engine.kv_cache_manager
    if variant == "prefix-cached":
        llm.generate(PROMPTS, SamplingParams(max_tokens=1), use_tqdm=False)
    hits_before = kv.prefix_cache_hits
    params = SamplingParams(n=n, temperature=temperature, seed=5, max_tokens=6, ignore_eos=True,
                            logprobs=num_logprobs, prompt_logprobs=num_prompt_logprobs)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert (llm.llm_engine.num_preemptions > 0) == (variant == "preemption")
    if variant != "preemption":  # a recomputed request may find its own (scored) blocks
        assert kv.prefix_cache_hits == hits_before, "prompt logprobs must not be skipped"
    hf_model = references(name)
    for output in outputs:
        prompt = output.prompt_token_ids
        assert len(output.outputs) == n
        for completion in output.outputs:
            reference = hf_log_softmax(hf_model, prompt + completion.token_ids)
            assert len(completion.logprobs) == len(completion.token_ids) == 6
            for i, (token_id, position) in enumerate(zip(completion.token_ids,
                                                         completion.logprobs)):
                check_position(position, token_id, reference[len(prompt) - 1 + i], num_logprobs)
            assert completion.cumulative_logprob == pytest.approx(
                sum(p[t].logprob for p, t in zip(completion.logprobs, completion.token_ids)))
        assert len(output.prompt_logprobs) == len(prompt) and output.prompt_logprobs[0] is None
        for i, position in enumerate(output.prompt_logprobs[1:], start=1):
            check_position(position, prompt[i], reference[i - 1], num_prompt_logprobs)


def test_without_logprobs_there_are_none(tiny_model_factory):
    llm = LLM(model=str(tiny_model_factory("llama")), device="cpu", dtype="float32")
    (output,) = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3), use_tqdm=False)
    assert output.prompt_logprobs is None
    assert output.outputs[0].logprobs is None and output.outputs[0].cumulative_logprob is None
