"""Multi-step decode (engine.scheduler): several decode steps per schedule give the tokens
one step per schedule gives.

`LLM.generate` requests that are plain greedy decode ahead: one schedule covers up to
`max_decode_steps` steps, each step's argmax feeding the next on the device. Stops
inside such a run (EOS, a stop token, max_tokens, the model length) must cut the output
exactly where single steps would, preemption must recompute it, and the KV a cut-short
run leaves in the prefix cache must be valid for the tokens it kept.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import ModelRunner
from cpu_threads import single_torch_thread  # noqa: F401
from tiny_models import tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DECODE_STEPS = 4


def make_llm(model_dir, monkeypatch, decode_steps: int, **kwargs) -> LLM:
    monkeypatch.setattr(ModelRunner, "max_decode_steps", decode_steps)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", **kwargs)
    assert llm.llm_engine.scheduler.config.num_decode_steps == decode_steps
    return llm


def generate(llm: LLM, prompts, params) -> tuple[list, list[int]]:
    """(each output's (token ids, finish reason, stop reason), decode_steps of every step)."""
    scheduler = llm.llm_engine.scheduler
    schedule, steps = scheduler.schedule, []

    def observed():
        output = schedule()
        steps.append(output.decode_steps)
        return output

    scheduler.schedule = observed
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del scheduler.schedule
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
            for o in outputs], steps


def random_prompts(num_prompts: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(
        4, 390, (int(torch.randint(1, 40, (), generator=generator)),),
        generator=generator).tolist()} for _ in range(num_prompts)]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("engine_kwargs", [
    dict(max_model_len=64),
    dict(max_model_len=64, num_gpu_blocks_override=12, block_size=8),  # preempts, recomputes
    dict(max_model_len=40, block_size=8),  # the model length ends requests mid-run
    dict(max_model_len=64, max_num_batched_tokens=16),  # chunked prefills between runs
], ids=["plain", "preemption", "model-length", "chunked-prefill"])
def test_multi_step_equals_single_step(name, engine_kwargs, tiny_model_factory, monkeypatch):
    model_dir = tiny_model_factory(name)
    prompts = random_prompts(12, seed=1)
    prompts = [p for p in prompts if len(p["prompt_token_ids"]) < engine_kwargs["max_model_len"]]
    generator = torch.Generator().manual_seed(2)
    max_tokens = torch.randint(1, 20, (len(prompts),), generator=generator).tolist()
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens]
    single, _ = generate(make_llm(model_dir, monkeypatch, 1, **engine_kwargs), prompts, params)
    # Stop tokens the single-step run met mid-output, so the runs of several steps cut there.
    params = [SamplingParams(temperature=0.0, max_tokens=n,
                             stop_token_ids=[tokens[len(tokens) // 2]] if i % 3 == 0 else None)
              for i, (n, (tokens, _, _)) in enumerate(zip(max_tokens, single))]
    single, _ = generate(make_llm(model_dir, monkeypatch, 1, **engine_kwargs), prompts, params)
    llm = make_llm(model_dir, monkeypatch, DECODE_STEPS, **engine_kwargs)
    multi, steps = generate(llm, prompts, params)
    assert multi == single
    assert max(steps) == DECODE_STEPS
    if "num_gpu_blocks_override" in engine_kwargs:
        assert llm.llm_engine.num_preemptions > 0


def test_requests_that_need_per_token_work_take_single_steps(tiny_model_factory, monkeypatch):
    """Only requests whose draws need nothing the host learns per token decode ahead:
    one other request in the batch keeps every step single."""
    llm = make_llm(tiny_model_factory("llama"), monkeypatch, DECODE_STEPS, max_model_len=64)
    prompts = random_prompts(3, seed=3)
    for other in (SamplingParams(temperature=0.8, seed=1, max_tokens=12, presence_penalty=0.5),
                  SamplingParams(temperature=0.0, max_tokens=12, logprobs=1),
                  SamplingParams(temperature=0.0, max_tokens=12, min_tokens=2),
                  SamplingParams(temperature=0.0, max_tokens=12, stop=["zz"])):
        params = [SamplingParams(temperature=0.0, max_tokens=12)] * 2 + [other]
        _, steps = generate(llm, prompts, params)
        assert set(steps) == {1}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_seeded_sampling_ahead_draws_what_single_steps_draw(name, tiny_model_factory,
                                                             monkeypatch):
    """Sampled requests decode ahead too, drawing each step on the device: a seeded one
    consumes its generator as single steps do, so its tokens are the same."""
    model_dir = tiny_model_factory(name)
    prompts = random_prompts(6, seed=5)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=i, max_tokens=5 + 3 * i)
              for i in range(len(prompts))]
    params[1] = SamplingParams(temperature=0.0, max_tokens=11)  # greedy rows mix in
    single, _ = generate(make_llm(model_dir, monkeypatch, 1, max_model_len=64), prompts, params)
    multi, steps = generate(make_llm(model_dir, monkeypatch, DECODE_STEPS, max_model_len=64),
                            prompts, params)
    assert multi == single
    assert max(steps) == DECODE_STEPS


def test_kv_of_a_run_cut_short_serves_prefix_hits(tiny_model_factory, monkeypatch):
    """A stop inside a multi-step run leaves KV computed past the last kept token; the
    blocks it caches must hold only the kept tokens' KV, so a prompt that continues that
    output generates what it generates from scratch."""
    model_dir = tiny_model_factory("llama")
    prompt = random_prompts(1, seed=4)[0]["prompt_token_ids"][:20] + list(range(5, 25))
    llm = make_llm(model_dir, monkeypatch, 8, max_model_len=128, block_size=8)
    ((tokens, _, _),), _ = generate(llm, [{"prompt_token_ids": prompt}],
                                    SamplingParams(temperature=0.0, max_tokens=20))
    stop = tokens[9]
    ((kept, reason, _),), _ = generate(llm, [{"prompt_token_ids": prompt}], SamplingParams(
        temperature=0.0, max_tokens=20, stop_token_ids=[stop]))
    assert reason == "stop" and kept == tokens[:tokens.index(stop) + 1]
    follow_up = [{"prompt_token_ids": prompt + kept + tokens[len(kept):len(kept) + 3]}]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    cached, _ = generate(llm, follow_up, params)
    fresh, _ = generate(make_llm(model_dir, monkeypatch, 1, max_model_len=128, block_size=8,
                                 enable_prefix_caching=False), follow_up, params)
    assert llm.llm_engine.kv_cache_manager.prefix_cache_hits > 0
    assert cached == fresh
