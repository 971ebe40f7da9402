"""The OpenAI-compatible server over real HTTP, driven by the official `openai` client.

One tiny random-weight llama serves every test through uvicorn on a free
loopback port. Greedy decoding makes streamed and non-streamed text comparable
exactly. Errors, authentication, disconnects and metrics: test_server_errors.py.
"""

import asyncio
import math
from collections.abc import Mapping

import openai
import pytest
import torch
from server_harness import base_url, engine, model_dir  # noqa: F401  (fixtures)
from server_harness import MAX_MODEL_LEN, MODEL_NAME, wait_idle
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)
from transformers import AutoTokenizer

PROMPT = "The capital of France is"
OTHER_PROMPT = "Once upon a time there was"
GREEDY = {"temperature": 0.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].max_model_len == MAX_MODEL_LEN


@pytest.mark.parametrize("prompt_kind", ["text", "token_ids"])
def test_completion_stream_equals_non_stream_and_usage_counts(client, tokenizer, prompt_kind):
    prompt_ids = tokenizer.encode(PROMPT)
    prompt = PROMPT if prompt_kind == "text" else prompt_ids
    full = client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY)
    assert (full.usage.prompt_tokens, full.usage.completion_tokens,
            full.usage.total_tokens) == (len(prompt_ids), 12, len(prompt_ids) + 12)
    assert full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    choice_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in choice_chunks) == full.choices[0].text
    assert choice_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage == full.usage and not chunks[-1].choices


def test_chat_stream_equals_non_stream_and_usage_counts(client, tokenizer):
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hello, how are you?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    num_prompt_tokens = len(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)
    full = client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (num_prompt_tokens, 12)
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=messages, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage == full.usage


def test_n_samples_differ_and_repeat_with_a_seed(client):
    def sample():
        response = client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, n=2, temperature=1.0, seed=3, max_tokens=8,
            logprobs=0, extra_body={"ignore_eos": True})
        assert [c.index for c in response.choices] == [0, 1]
        assert response.usage.completion_tokens == 16
        return [(c.logprobs.tokens, c.logprobs.token_logprobs) for c in response.choices]

    first = sample()
    assert first[0] != first[1]
    assert sample() == first
    texts, finish_reasons = {}, {}
    for chunk in client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], n=2, stream=True,
            temperature=1.0, max_tokens=6):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finish_reasons[choice.index] = choice.finish_reason or finish_reasons.get(
                choice.index)
    assert sorted(texts) == [0, 1] and all(finish_reasons.values())


def test_several_prompts_with_n(client):
    single = [client.completions.create(model=MODEL_NAME, prompt=p, **GREEDY).choices[0].text
              for p in (PROMPT, OTHER_PROMPT)]
    both = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, OTHER_PROMPT], n=2,
                                     **GREEDY)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [single[0], single[0], single[1], single[1]]
    assert both.usage.completion_tokens == 4 * 12


def test_streamed_choices_of_several_prompts_with_n_equal_the_whole_response(client):
    request = {"model": MODEL_NAME, "prompt": [PROMPT, OTHER_PROMPT], "n": 2,
               "temperature": 1.0, "seed": 9, "max_tokens": 8, "echo": True, "logprobs": 1,
               "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**request)
    texts, tokens, finish_reasons = {}, {}, {}
    for chunk in client.completions.create(stream=True, **request):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            tokens[choice.index] = tokens.get(choice.index, []) + choice.logprobs.tokens
            if choice.finish_reason is not None:
                finish_reasons.setdefault(choice.index, []).append(choice.finish_reason)
    assert texts == {c.index: c.text for c in full.choices}
    assert tokens == {c.index: c.logprobs.tokens for c in full.choices}
    assert finish_reasons == {i: ["length"] for i in range(4)}  # once per choice


def test_seeded_choice_i_is_the_single_request_seeded_seed_plus_i(client):
    sampled = {"prompt": PROMPT, "temperature": 1.0, "max_tokens": 8,
               "extra_body": {"ignore_eos": True}}
    both = client.completions.create(model=MODEL_NAME, n=2, seed=5, **sampled)
    alone = [client.completions.create(model=MODEL_NAME, seed=seed, **sampled).choices[0]
             for seed in (5, 6)]
    assert [c.text for c in both.choices] == [c.text for c in alone]
    assert [c.finish_reason for c in both.choices] == ["length", "length"]


def test_n_choices_share_the_prompt_kv_blocks(client, engine):
    """n=4 on one prompt holds its blocks once; 4 prompts of that length hold 4 copies."""
    num_prompt_tokens, n, block_size = 100, 4, engine.config.block_size
    generator = torch.Generator().manual_seed(17)
    prompts = torch.randint(4, len(engine.tokenizer), (n + 1, num_prompt_tokens),
                            generator=generator).tolist()  # fresh: no prefix-cache hits

    def peak_blocks(**request) -> int:
        steps = []
        wait_idle(engine)
        engine.add_step_listener(steps.append)
        try:
            response = client.completions.create(model=MODEL_NAME, temperature=1.0,
                                                 max_tokens=8, seed=0,
                                                 extra_body={"ignore_eos": True}, **request)
        finally:
            engine.remove_step_listener(steps.append)
        assert [c.index for c in response.choices] == list(range(n))
        assert [c.finish_reason for c in response.choices] == ["length"] * n
        assert response.usage.completion_tokens == n * 8
        kv = engine.engine.kv_cache_manager
        return kv.num_blocks - min(stats.num_free_blocks for stats in steps)

    prompt_blocks = math.ceil(num_prompt_tokens / block_size)
    forked = peak_blocks(prompt=prompts[0], n=n)
    independent = peak_blocks(prompt=prompts[1:])
    # the prompt's full blocks once, plus each sample's copy of the partial last block
    assert forked <= num_prompt_tokens // block_size + n + 1 < independent
    assert independent >= n * prompt_blocks
    wait_idle(engine)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(client, stream):
    text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY).choices[0].text
    assert len(text) >= 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    expected = text[:text.find(stop)]
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, stop=[stop],
                                         stream=stream, **GREEDY)
    choices = [c.choices[0] for c in response] if stream else response.choices
    assert "".join(c.text for c in choices) == expected
    assert choices[-1].finish_reason == "stop"
    assert choices[-1].stop_reason == stop


def test_echo_and_logprobs(client, tokenizer):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True,
                                         logprobs=2, **GREEDY)
    choice = response.choices[0]
    assert choice.text.startswith(PROMPT)
    choice_logprobs = choice.logprobs
    num_prompt_tokens = len(tokenizer.encode(PROMPT))
    assert len(choice_logprobs.tokens) == num_prompt_tokens + 12
    for logprob, top in zip(choice_logprobs.token_logprobs[num_prompt_tokens:],
                            choice_logprobs.top_logprobs[num_prompt_tokens:]):
        assert 1 <= len(top) <= 3 and logprob == max(top.values()) <= 0.0  # greedy
    chat = client.chat.completions.create(model=MODEL_NAME, logprobs=True, top_logprobs=3,
                                          messages=[{"role": "user", "content": "Hi"}],
                                          **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 12
    for token in content:
        values = [top.logprob for top in token.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert token.logprob == values[0]


def test_64_concurrent_streams_are_batched(base_url, engine):
    steps = []
    engine.add_step_listener(steps.append)

    async def one(client, i):
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=f"{PROMPT} {i}", max_tokens=8, temperature=0.0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        chunks = [chunk async for chunk in stream]
        return chunks[-1].usage.completion_tokens, [c for c in chunks if c.choices][-1]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused",
                                      max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    try:
        results = asyncio.run(run())
    finally:
        engine.remove_step_listener(steps.append)
    assert [tokens for tokens, _ in results] == [8] * 64
    assert all(last.choices[0].finish_reason == "length" for _, last in results)
    assert max(stats.num_running for stats in steps) > 1
    wait_idle(engine)
