"""Overload: a bounded waiting queue; beyond it 503 with Retry-After, not unbounded growth.

A burst of concurrent requests hits a server whose engine runs at most
MAX_NUM_SEQS sequences and queues at most MAX_NUM_WAITING more (steps are
slowed so that the burst really outruns it). Every request gets either its
full completion or a 503 with Retry-After and an OpenAI error body; the
waiting queue and the requests held in memory never exceed the bound; the
server serves normally afterwards.
"""

import asyncio
import threading
import time

import httpx
import pytest
from cpu_threads import single_torch_thread  # noqa: F401  (fixture)
from server_harness import base_url, model_dir  # noqa: F401  (fixtures)
from server_harness import start_engine, wait_idle
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)

from engine.admission import EngineOverloadedError
from engine.async_engine import AsyncLLMEngine
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_NUM_SEQS = 4
MAX_NUM_WAITING = 8
MAX_TOKENS = 4


class QueueWatch:
    """Step listener: the longest waiting queue and most requests in flight seen."""

    def __init__(self, engine: AsyncLLMEngine):
        self.engine = engine
        self.max_waiting = self.max_admitted_waiting = self.max_in_flight = 0
        self.lock = threading.Lock()

    def __call__(self, stats) -> None:
        time.sleep(0.01)  # slow steps: the burst must outrun the engine
        with self.lock:
            self.max_waiting = max(self.max_waiting, stats.num_waiting)
            self.max_admitted_waiting = max(self.max_admitted_waiting, self.engine.num_waiting)
            self.max_in_flight = max(self.max_in_flight,
                                     self.engine.engine.get_num_unfinished_requests())


@pytest.fixture(scope="module")
def engine(model_dir):  # noqa: F811
    engine = start_engine(model_dir, max_num_waiting=MAX_NUM_WAITING, max_model_len=64,
                          max_num_seqs=MAX_NUM_SEQS, num_gpu_blocks_override=64)
    yield engine
    engine.shutdown()


async def one_request(client: httpx.AsyncClient, i: int) -> tuple[int, httpx.Headers, dict]:
    body = {"prompt": f"Hello {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": i % 2 == 1}
    if not body["stream"]:
        response = await client.post("/v1/completions", json=body)
        return response.status_code, response.headers, response.json()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return response.status_code, response.headers, (await response.aread() and
                                                            response.json())
        events = [line async for line in response.aiter_lines() if line]
        assert events[-1] == "data: [DONE]"
        text = "".join(httpx.Response(200, content=e[len("data: "):]).json()["choices"][0]
                       ["text"] for e in events[:-1])
        return 200, response.headers, {"stream_text": text, "num_events": len(events)}


@pytest.mark.parametrize("num_requests", [64, pytest.param(400, marks=pytest.mark.slow)])
def test_a_burst_beyond_the_queue_gets_503_with_retry_after(engine, base_url, num_requests):
    watch = QueueWatch(engine)
    engine.add_step_listener(watch)

    async def burst():
        limits = httpx.Limits(max_connections=num_requests)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one_request(client, i) for i in range(num_requests)))

    try:
        results = asyncio.run(burst())
    finally:
        engine.remove_step_listener(watch)
    served = [body for status, _, body in results if status == 200]
    refused = [(headers, body) for status, headers, body in results if status == 503]
    assert len(served) + len(refused) == num_requests
    assert len(served) >= MAX_NUM_WAITING and refused
    for body in served:
        if "usage" in body:
            assert body["usage"]["completion_tokens"] == MAX_TOKENS
        else:
            assert body["num_events"] >= 2
    for headers, body in refused:
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["type"] == "server_error"
        assert body["error"]["code"] == "overloaded"
        assert f"max_num_waiting={MAX_NUM_WAITING}" in body["error"]["message"]
    assert watch.max_admitted_waiting <= MAX_NUM_WAITING
    # Preempted requests may rejoin the queue; new ones never push it past the bound.
    assert watch.max_waiting <= MAX_NUM_WAITING + MAX_NUM_SEQS
    assert watch.max_in_flight <= MAX_NUM_WAITING + MAX_NUM_SEQS
    wait_idle(engine)
    assert engine.num_waiting == 0
    assert httpx.get(f"{base_url}/health").status_code == 200
    response = httpx.post(f"{base_url}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_a_request_larger_than_the_queue_is_a_400_naming_n(base_url):
    response = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "prompt": ["Hi", "Hello", "Hey"], "n": MAX_NUM_SEQS, "max_tokens": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "n" and "max_num_waiting" in error["message"]


def test_the_async_engine_refuses_past_the_bound_and_admits_again_when_drained(engine):
    """Requests submitted in one go are counted at once, whatever the engine thread does."""
    params = SamplingParams(max_tokens=2)

    async def run():
        with pytest.raises(ValueError, match="max_num_waiting"):
            await engine.add_requests([(f"big-{i}", "Hi", params)
                                       for i in range(MAX_NUM_WAITING + 1)])
        results = await asyncio.gather(*(engine.add_requests([(f"fill-{i}", "Hi", params)])
                                         for i in range(40)), return_exceptions=True)
        streams = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, EngineOverloadedError)]
        assert len(streams) + len(refused) == 40
        assert MAX_NUM_WAITING <= len(streams) <= MAX_NUM_WAITING + MAX_NUM_SEQS
        for stream in streams:
            async for _ in stream:
                pass
        stream = await engine.add_requests([("after", "Hi", params)])
        return [output async for _, output in stream][-1]

    assert asyncio.run(run()).finished
    wait_idle(engine)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_num_waiting_must_be_a_positive_int(engine, value):
    with pytest.raises(ValueError, match="max_num_waiting"):
        AsyncLLMEngine(engine.engine, max_num_waiting=value)
