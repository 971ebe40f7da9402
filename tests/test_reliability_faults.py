"""Fault isolation: a request whose processing raises fails alone, with a clear error.

Faults are injected where a real one would come from: the server's tokenizer
(prompt encoding, before the engine), the engine's tokenizer (detokenizing one
request's generated token, inside a step) and the sampler (one request's
sampling row, inside a batched step). The poisoned request gets a 500 (or, when
streaming, an error event and [DONE]) naming the error; the requests batched
with it finish with exactly their fault-free greedy text; the engine loop
serves on and every KV block comes back.
"""

import asyncio

import httpx
import pytest
import torch
from cpu_threads import single_torch_thread  # noqa: F401  (fixture)
from server_harness import base_url, engine, model_dir  # noqa: F401  (fixtures)
from server_harness import wait_idle
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)
from transformers import PreTrainedTokenizerFast

from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("single_torch_thread")

HEALTHY = ["The capital of France is", "Hello, how are you", "def add(a, b):",
           "Once upon a time"]
POISONED = "user: what is two"
POISON_TEMPERATURE = 0.77
GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def reference(base_url):  # noqa: F811
    """Fault-free greedy completion of every prompt, one request each."""
    return {prompt: httpx.post(f"{base_url}/v1/completions", timeout=60,
                               json={"prompt": prompt, **GREEDY}).json()["choices"][0]["text"]
            for prompt in HEALTHY + [POISONED]}


def run_together(base_url: str, bodies: list[dict]) -> list[httpx.Response]:  # noqa: F811
    """POST all bodies at once, so the engine batches them; responses in order."""
    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body)
                                          for body in bodies))
    return asyncio.run(run())


def assert_isolated(base_url, engine, reference, poisoned_body: dict,  # noqa: F811
                    expected_message: str) -> None:
    bodies = [{"prompt": prompt, **GREEDY} for prompt in HEALTHY]
    bodies.insert(2, poisoned_body)
    responses = run_together(base_url, bodies)
    failed = responses.pop(2)
    if poisoned_body.get("stream"):
        assert failed.status_code == 200
        events = [line[len("data: "):] for line in failed.text.splitlines() if line]
        assert events[-1] == "[DONE]" and "error" in events[-2]
        error = httpx.Response(500, content=events[-2]).json()["error"]
    else:
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
    assert error["type"] == "server_error" and expected_message in error["message"]
    for prompt, response in zip(HEALTHY, responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == reference[prompt]
    wait_idle(engine)


def assert_serves_again(base_url, reference) -> None:  # noqa: F811
    response = httpx.post(f"{base_url}/v1/completions", json={"prompt": POISONED, **GREEDY},
                          timeout=60)
    assert response.json()["choices"][0]["text"] == reference[POISONED]


def test_a_prompt_the_server_tokenizer_fails_on_fails_alone(
        base_url, engine, reference, monkeypatch):  # noqa: F811
    encode = PreTrainedTokenizerFast.encode

    def failing_encode(self, text, *args, **kwargs):
        if text == POISONED:
            raise InjectedFault("injected tokenizer failure")
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "encode", failing_encode)
    assert_isolated(base_url, engine, reference, {"prompt": POISONED, **GREEDY},
                    "InjectedFault: injected tokenizer failure")
    monkeypatch.undo()
    assert_serves_again(base_url, reference)


@pytest.mark.parametrize("stream", [False, True])
def test_a_token_the_engine_cannot_detokenize_fails_its_request_alone(
        base_url, engine, reference, model_dir, monkeypatch, stream):  # noqa: F811
    """The poison is a token only the poisoned request generates (chosen from the
    fault-free run); decoding it raises inside the engine step."""
    tokenizer = engine.engine.tokenizer
    token_ids = {prompt: greedy_token_ids(engine, prompt) for prompt in HEALTHY + [POISONED]}
    others = set(tokenizer.encode(POISONED)).union(*(
        tokenizer.encode(prompt) + token_ids[prompt] for prompt in HEALTHY))
    generated = token_ids[POISONED]
    unique = [t for t in generated[1:] if t not in others]
    assert unique, "pick a POISONED prompt that generates a token no other prompt sees"
    poison = max(unique, key=generated.index)  # the latest: the others have joined by then
    convert = tokenizer.convert_ids_to_tokens
    running_at_fault = []

    def failing_convert(ids, *args, **kwargs):
        if poison in ([ids] if isinstance(ids, int) else ids):
            running_at_fault.append(engine.engine.scheduler.num_running)
            raise InjectedFault(f"injected: cannot decode token {poison}")
        return convert(ids, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "convert_ids_to_tokens", failing_convert)
    assert_isolated(base_url, engine, reference,
                    {"prompt": POISONED, "stream": stream, **GREEDY},
                    f"cannot decode token {poison}")
    assert running_at_fault[0] > 1  # it failed in a step shared with other requests
    monkeypatch.undo()
    assert_serves_again(base_url, reference)


@pytest.mark.parametrize("stream", [False, True])
def test_a_sampler_error_fails_only_the_request_it_came_from(
        base_url, engine, reference, monkeypatch, stream):  # noqa: F811
    """The poisoned request's rows break the sampler from its 3rd token on, when
    the requests sent with it have joined its batch."""
    runner = engine.engine.model_runner
    sampler = runner.sampler
    poisoned_rows_seen, batch_sizes_at_fault = [], []

    def failing_sampler(logits, metadata):
        if torch.isclose(metadata.temperature, torch.tensor(POISON_TEMPERATURE)).any():
            poisoned_rows_seen.append(logits.shape[0])
            if len(poisoned_rows_seen) >= 3:
                batch_sizes_at_fault.append(logits.shape[0])
                raise InjectedFault("injected sampler failure")
        return sampler(logits, metadata)

    monkeypatch.setattr(runner, "sampler", failing_sampler)
    poisoned = {"prompt": POISONED, "stream": stream, **GREEDY,
                "temperature": POISON_TEMPERATURE, "seed": 1}
    assert_isolated(base_url, engine, reference, poisoned, "injected sampler failure")
    assert batch_sizes_at_fault[0] > 1  # it failed in a batch shared with other requests
    monkeypatch.undo()
    assert_serves_again(base_url, reference)


def greedy_token_ids(engine, prompt: str) -> list[int]:  # noqa: F811
    async def run():
        async for output in engine.generate(prompt, SamplingParams(**GREEDY), prompt):
            last = output
        return last.outputs[0].token_ids
    return asyncio.run(run())
