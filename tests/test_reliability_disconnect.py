"""Disconnect storm: many concurrent streaming clients, a random fifth of them leave mid-stream.

The leavers ask for long completions and hang up after a few chunks; the
others stream theirs to the end. Meanwhile a prober checks that the server
keeps answering. Every remaining stream must carry exactly its greedy text
(from an offline run of the same model), every request must be accounted for
exactly once (aborted, or finished if the server had streamed it all before
the client hung up), and the free KV blocks must return to their initial count.
"""

import asyncio
import json
import random
import time

import httpx
import pytest
from cpu_threads import single_torch_thread  # noqa: F401  (fixture)
from server_harness import base_url, model_dir  # noqa: F401  (fixtures)
from server_harness import metric, scrape, start_engine, wait_idle
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)

from engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_MODEL_LEN = 128
NUM_BLOCKS = 1024
MAX_TOKENS, LEAVER_MAX_TOKENS = 32, 96


@pytest.fixture(scope="module")
def engine(model_dir):  # noqa: F811
    engine = start_engine(model_dir, max_model_len=MAX_MODEL_LEN,
                          num_gpu_blocks_override=NUM_BLOCKS)
    yield engine
    engine.shutdown()


async def stream_client(client: httpx.AsyncClient, prompt: list[int], max_tokens: int,
                        leave_after: int | None) -> tuple[str, str | None]:
    """-> (streamed text, last finish_reason); leaves after `leave_after` chunks if set."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    text, finish_reason, num_chunks = "", None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                return text, finish_reason
            choice = json.loads(line[len("data: "):])["choices"][0]
            text += choice["text"]
            finish_reason = choice["finish_reason"] or finish_reason
            num_chunks += 1
            if num_chunks == leave_after:
                return text, None  # leaving the block closes the connection
    raise AssertionError("the stream ended without [DONE]")


async def probe(client: httpx.AsyncClient, stop: asyncio.Event) -> int:
    """Health checks and small completions while the storm lasts -> how many succeeded."""
    answered = 0
    while not stop.is_set():
        assert (await client.get("/health")).status_code == 200
        response = await client.post("/v1/completions", json={
            "prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
        assert response.status_code == 200, response.text
        answered += 1
        await asyncio.sleep(0.05)
    return answered


@pytest.mark.parametrize("num_clients", [40, pytest.param(200, marks=pytest.mark.slow)])
def test_a_storm_of_disconnects_leaves_the_others_intact_and_frees_every_block(
        engine, base_url, model_dir, num_clients):  # noqa: F811
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    vocab_size = engine.engine.vocab_size
    prompts = [[rng.randrange(4, vocab_size) for _ in range(rng.randint(3, 16))]
               for _ in range(num_clients)]
    leave_after = {i: rng.randint(1, 3) for i in rng.sample(range(num_clients),
                                                            num_clients // 5)}
    stayers = [i for i in range(num_clients) if i not in leave_after]
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    reference = {i: o.outputs[0].text for i, o in zip(stayers, llm.generate(
        [{"prompt_token_ids": prompts[i]} for i in stayers],
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
        use_tqdm=False))}
    kv = engine.engine.kv_cache_manager
    wait_idle(engine)
    initial_free_blocks = kv.num_free_blocks
    before = scrape(base_url)

    async def storm():
        limits = httpx.Limits(max_connections=num_clients + 2)
        async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
            stop = asyncio.Event()
            prober = asyncio.create_task(probe(client, stop))
            results = await asyncio.gather(*(stream_client(
                client, prompts[i], LEAVER_MAX_TOKENS if i in leave_after else MAX_TOKENS,
                leave_after.get(i)) for i in range(num_clients)))
            stop.set()
            return results, await prober

    start = time.monotonic()
    results, probes_answered = asyncio.run(storm())
    elapsed = time.monotonic() - start
    assert probes_answered >= 1
    for i in stayers:
        assert results[i] == (reference[i], "length"), f"client {i} (seed {seed})"
    wait_idle(engine, timeout=30)
    assert kv.num_free_blocks == initial_free_blocks == kv.num_blocks
    after = scrape(base_url)

    def finished(reason: str) -> float:
        return metric(after, "vllm:request_success_total", finished_reason=reason) - \
            metric(before, "vllm:request_success_total", finished_reason=reason)

    print(f"\ndisconnect storm (seed {seed}): {num_clients} streaming clients, "
          f"{len(leave_after)} left mid-stream ({finished('abort'):.0f} aborted), "
          f"{probes_answered} probes answered, {elapsed:.1f} s")
    assert finished("abort") + finished("length") == num_clients + probes_answered
    assert len(leave_after) / 2 <= finished("abort") <= len(leave_after)
