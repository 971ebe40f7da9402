"""AsyncLLMEngine: a background step loop serving many coroutines at once.

Concurrent requests are batched and give the offline engine's results; an
aborted request gives its KV blocks back before the next step; a bad request or
a failing step reaches only the requests concerned; an idle loop sleeps.
"""

import asyncio
import threading
import time

import pytest
from server_harness import wait_idle
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)

from engine import LLM, SamplingParams
from engine.async_engine import AsyncLLMEngine, EngineShutdownError
from engine.config import EngineConfig

PROMPTS = ["Hello, how are you", "The capital of France", "def add(a, b):", "Once upon a"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
NUM_BLOCKS = 64


class StepLog:
    """A step listener remembering every StepStats (called on the engine thread)."""

    def __init__(self):
        self.stats = []
        self.lock = threading.Lock()

    def __call__(self, stats):
        with self.lock:
            self.stats.append(stats)

    def __len__(self):
        with self.lock:
            return len(self.stats)

    def since(self, start: int):
        with self.lock:
            return self.stats[start:]


@pytest.fixture(scope="module")
def served(tiny_model_factory):  # noqa: F811
    """(engine, step log, offline greedy texts of PROMPTS)."""
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", dtype="float32", max_model_len=128,
              num_gpu_blocks_override=NUM_BLOCKS)
    reference = [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    engine = AsyncLLMEngine(llm.llm_engine)
    log = StepLog()
    engine.add_step_listener(log)
    yield engine, log, reference
    engine.shutdown()


async def final_output(engine, prompt, params, request_id):
    last = None
    async for output in engine.generate(prompt, params, request_id):
        last = output
    return last


def test_concurrent_requests_are_batched_and_match_offline(served):
    engine, log, reference = served
    start = len(log)

    async def run():
        return await asyncio.gather(*(final_output(engine, prompt, GREEDY, f"batch-{i}")
                                      for i, prompt in enumerate(PROMPTS)))

    outputs = asyncio.run(run())
    assert [o.outputs[0].text for o in outputs] == reference
    assert all(o.finished and len(o.outputs[0].token_ids) == 8 for o in outputs)
    assert max(s.num_running for s in log.since(start)) > 1
    wait_idle(engine)


def test_abort_frees_blocks_before_the_next_step(served):
    engine, log, _ = served

    async def run():
        generator = engine.generate("Hello", LONG, "to-abort")
        seen = [await generator.__anext__() for _ in range(3)]
        before_abort = len(log)
        await generator.aclose()
        return seen, before_abort

    seen, before_abort = asyncio.run(run())
    assert not seen[-1].finished
    wait_idle(engine)
    after = log.since(before_abort)
    # At most the step running when the abort came; then the blocks are free.
    assert sum(s.num_steps for s in after) <= 1
    assert [f.finish_reason for s in after for f in s.finished] == ["abort"]


def test_a_bad_request_fails_alone(served):
    engine, _, reference = served

    async def run():
        good = asyncio.create_task(final_output(engine, PROMPTS[0], GREEDY, "good"))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_requests([("bad", "x " * 200, GREEDY)])
        return await good

    assert asyncio.run(run()).outputs[0].text == reference[0]
    wait_idle(engine)


def test_a_failing_step_fails_the_requests_in_flight_and_the_loop_goes_on(served, monkeypatch):
    engine, _, reference = served
    real_step = engine.engine.step
    calls = []

    def step_failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected step failure")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", step_failing_once)

    async def run():
        with pytest.raises(RuntimeError, match="injected step failure"):
            await final_output(engine, PROMPTS[1], GREEDY, "doomed")
        return await final_output(engine, PROMPTS[1], GREEDY, "after")

    assert asyncio.run(run()).outputs[0].text == reference[1]
    wait_idle(engine)


def test_n_samples_are_distinct_and_reproducible(served):
    engine, _, _ = served
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)

    async def run(request_id):
        return await final_output(engine, "Hello", params, request_id)

    first, second = asyncio.run(run("n-a")), asyncio.run(run("n-b"))
    assert first.request_id == "n-a" and first.finished
    assert [c.index for c in first.outputs] == [0, 1]
    assert all(c.finish_reason == "length" for c in first.outputs)
    tokens = [c.token_ids for c in first.outputs]
    assert tokens[0] != tokens[1]
    assert tokens == [c.token_ids for c in second.outputs]
    wait_idle(engine)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8"])
def test_a_bad_max_num_waiting_is_refused_before_the_model_loads(monkeypatch, value):
    def load(config):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("engine.async_engine.LLMEngine", load)
    with pytest.raises(ValueError, match="max_num_waiting"):
        AsyncLLMEngine.from_config(EngineConfig(model="unused"), max_num_waiting=value)


def test_an_idle_loop_sleeps(served):
    engine, log, _ = served
    wait_idle(engine)
    time.sleep(0.05)
    count = len(log)
    time.sleep(0.3)
    assert len(log) == count  # every loop iteration reports: none ran


def test_shutdown_fails_requests_in_flight_and_refuses_new_ones(served):
    engine, _, _ = served

    async def run():
        generator = engine.generate("Hello", LONG, "at-shutdown")
        await generator.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineShutdownError):
            async for _ in generator:
                pass
        with pytest.raises(EngineShutdownError):
            await engine.add_requests([("late", "Hello", GREEDY)])

    asyncio.run(run())
    assert not engine.is_running
    assert not engine.engine.has_unfinished_requests()
