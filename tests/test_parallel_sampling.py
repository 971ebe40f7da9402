"""n > 1: the prompt is prefilled once and the samples fork its KV blocks.

Sample i of a seeded request is the n=1 request seeded seed + i; greedy samples are
identical; prompt tokens are scheduled once however large n is; a 512-token prompt with n=4
holds far fewer KV blocks than 4 independent requests; outputs have n completions.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from benchmarks.parallel_sampling import StepProbe
from cpu_threads import single_torch_thread  # noqa: F401
from engine import LLM, SamplingParams
from engine.parallel_sampling import sample_request_id
from tiny_models import hf_reference_model, tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PROMPT = "Once upon a time there was a small"


@pytest.fixture(scope="module")
def long_context_model(tiny_model_factory, tmp_path_factory):
    """The tiny llama with a 1024-token context (rope has no learned positions to extend)."""
    model_dir = shutil.copytree(tiny_model_factory("llama"),
                                tmp_path_factory.mktemp("long") / "llama-1k")
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def llm(long_context_model):
    return LLM(model=str(long_context_model), device="cpu", dtype="float32", block_size=16)


def token_ids(output) -> list[list[int]]:
    return [c.token_ids for c in output.outputs]


@pytest.fixture
def probe(llm):
    probe = StepProbe(llm)
    yield probe
    probe.restore()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_seeded_samples_equal_independent_seeded_requests(llm, temperature, top_p):
    params = SamplingParams(n=4, temperature=temperature, top_p=top_p, seed=77, max_tokens=12,
                            ignore_eos=True)
    (output,) = llm.generate(PROMPT, params, use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1, 2, 3] and output.finished
    samples = token_ids(output)
    assert len({tuple(s) for s in samples}) == 4, "seeds 77..80 must give different samples"
    independent = llm.generate([PROMPT] * 4, [
        SamplingParams(temperature=temperature, top_p=top_p, seed=77 + i, max_tokens=12,
                       ignore_eos=True) for i in range(4)], use_tqdm=False)
    assert samples == [o.outputs[0].token_ids for o in independent]
    (again,) = llm.generate(PROMPT, params, use_tqdm=False)
    assert token_ids(again) == samples


def test_samples_survive_preemption(llm, long_context_model):
    """A pool too small for 4 samples at once: samples are preempted and recomputed, and
    still equal the seeded n=1 requests."""
    tight = LLM(model=str(long_context_model), device="cpu", dtype="float32", block_size=16,
                num_gpu_blocks_override=8)
    params = dict(temperature=1.0, max_tokens=40, ignore_eos=True)
    (output,) = tight.generate(PROMPT, SamplingParams(n=4, seed=5, **params), use_tqdm=False)
    assert tight.llm_engine.num_preemptions > 0
    independent = llm.generate([PROMPT] * 4, [SamplingParams(seed=5 + i, **params)
                                              for i in range(4)], use_tqdm=False)
    assert token_ids(output) == [o.outputs[0].token_ids for o in independent]


def test_greedy_samples_are_identical(llm):
    (output,) = llm.generate(PROMPT, SamplingParams(n=2, temperature=0.0, max_tokens=10),
                             use_tqdm=False)
    (single,) = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=10),
                             use_tqdm=False)
    assert token_ids(output) == [single.outputs[0].token_ids] * 2
    assert [c.text for c in output.outputs] == [single.outputs[0].text] * 2


@pytest.mark.parametrize("num_prompt_tokens, max_num_batched_tokens", [(37, None), (100, 32)])
def test_prompt_is_prefilled_once(long_context_model, num_prompt_tokens,
                                  max_num_batched_tokens):
    llm = LLM(model=str(long_context_model), device="cpu", dtype="float32", block_size=16,
              max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False)
    probe = StepProbe(llm)
    prompt = {"prompt_token_ids": list(range(10, 10 + num_prompt_tokens))}
    (output,) = llm.generate(prompt, SamplingParams(n=4, seed=3, max_tokens=6, ignore_eos=True),
                             use_tqdm=False)
    assert probe.prompt_tokens == num_prompt_tokens
    assert [len(c.token_ids) for c in output.outputs] == [6] * 4


def test_n4_holds_fewer_kv_blocks_than_4_requests(llm, probe):
    prompt = {"prompt_token_ids": [5 + i % 300 for i in range(512)]}
    sampled = SamplingParams(n=4, seed=0, max_tokens=16, ignore_eos=True)
    llm.generate(prompt, sampled, use_tqdm=False)
    forked_peak = probe.peak_blocks
    probe.reset()
    # another prompt, so that the first one's cached blocks give no prefix hits
    independent = [SamplingParams(seed=i, max_tokens=16, ignore_eos=True) for i in range(4)]
    llm.generate([{"prompt_token_ids": [6 + i % 300 for i in range(512)]}] * 4, independent,
                 use_tqdm=False)
    prompt_blocks = math.ceil(512 / 16)
    # the prompt once, plus each sample's own tail (the copied partial block and 16 tokens)
    assert prompt_blocks < forked_peak <= prompt_blocks + 4 * 2
    assert probe.peak_blocks >= 4 * prompt_blocks


def test_sample_zero_finishing_first_keeps_the_others(llm):
    """Sample 0's first token is a stop token: the other samples still share its blocks."""
    (single,) = llm.generate(PROMPT, SamplingParams(seed=11, max_tokens=8), use_tqdm=False)
    stop_id = single.outputs[0].token_ids[0]
    stopping = SamplingParams(n=3, seed=11, max_tokens=8, stop_token_ids=[stop_id])
    (output,) = llm.generate(PROMPT, stopping, use_tqdm=False)
    first = output.outputs[0]
    assert first.token_ids == [stop_id] and first.finish_reason == "stop"
    assert first.stop_reason == stop_id
    independent = llm.generate([PROMPT] * 2, [
        SamplingParams(seed=11 + i, max_tokens=8, stop_token_ids=[stop_id]) for i in (1, 2)],
        use_tqdm=False)
    assert token_ids(output)[1:] == [o.outputs[0].token_ids for o in independent]


def test_mixed_batch_logprobs_and_abort(llm):
    engine = llm.llm_engine
    params = SamplingParams(n=3, temperature=0.8, max_tokens=6, logprobs=2, ignore_eos=True)
    outputs = llm.generate([PROMPT, "Hello"], [params, SamplingParams(max_tokens=4)],
                           use_tqdm=False)
    assert [len(o.outputs) for o in outputs] == [3, 1]
    for completion in outputs[0].outputs:
        assert len(completion.logprobs) == 6
        assert completion.cumulative_logprob == pytest.approx(sum(
            position[t].logprob for position, t in zip(completion.logprobs, completion.token_ids)))
    engine.add_request("group", PROMPT, SamplingParams(n=4, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert sample_request_id("group", 3) in engine.scheduler.requests
    engine.abort_request("group")
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished_requests()
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_n_over_one_request_id_clash_is_a_value_error(llm):
    engine = llm.llm_engine
    engine.add_request(sample_request_id("x", 1), PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("x", PROMPT, SamplingParams(n=2, max_tokens=2))
    engine.abort_request(sample_request_id("x", 1))
    assert not engine.has_unfinished_requests()


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test, pooling the tokens expected fewer than 5 times into one bin."""
    rare = expected < 5
    observed = torch.cat([observed[~rare], observed[rare].sum(0, keepdim=True)])
    expected = torch.cat([expected[~rare], expected[rare].sum(0, keepdim=True)])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(observed) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_sampled_distribution_matches_softmax_over_temperature(llm, long_context_model,
                                                                temperature):
    num_samples = 4000
    (output,) = llm.generate(PROMPT, SamplingParams(n=num_samples, temperature=temperature,
                                                    seed=1234, max_tokens=1), use_tqdm=False)
    first_tokens = torch.tensor([c.token_ids[0] for c in output.outputs])
    hf_model = hf_reference_model(long_context_model)
    with torch.no_grad():
        logits = hf_model(torch.tensor([output.prompt_token_ids])).logits[0, -1].double()
    probs = (logits / temperature).softmax(-1)
    observed = first_tokens.bincount(minlength=probs.shape[0]).double()
    assert chi_square_p_value(observed, probs * num_samples) > 1e-3
    # the same test rejects a wrong temperature
    wrong = (logits / (temperature * 1.3)).softmax(-1)
    assert chi_square_p_value(observed, wrong * num_samples) < 1e-3
