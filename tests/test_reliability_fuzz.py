"""Fuzzing: the server's own OpenAPI schema drives schemathesis against a live server.

For every operation, schemathesis generates schema-valid bodies (which run real
generations) and schema-violating ones; each goes over loopback HTTP and must
get a non-5xx answer, an OpenAI error body when refused, and a complete event
stream when streamed. Then hand-written bad input: malformed JSON, wrong
types, missing fields, negative, NaN and huge numbers, unknown fields, empty
and huge prompts, invalid UTF-8, max_tokens beyond the context, n = 0 and
huge, logprobs out of range; each gets its 400 naming the parameter. After all
of it the server answers, and every KV block is free.
"""

import collections
import json

import httpx
import pytest
import schemathesis
from cpu_threads import single_torch_thread  # noqa: F401  (fixture)
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from server_harness import base_url, model_dir  # noqa: F401  (fixtures)
from server_harness import start_engine, wait_idle
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_MODEL_LEN = 32  # short generations keep valid fuzz cases fast
MAX_NUM_SEQS = 8
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def engine(model_dir):  # noqa: F811
    engine = start_engine(model_dir, max_num_waiting=64, max_model_len=MAX_MODEL_LEN,
                          max_num_seqs=MAX_NUM_SEQS, num_gpu_blocks_override=64)
    yield engine
    engine.shutdown()


def check_response(status: int, content_type: str, text: str) -> None:
    assert status < 500, text
    if status >= 400:
        assert set(json.loads(text)["error"]) == ERROR_FIELDS, text
    elif content_type.startswith("text/event-stream"):
        assert text.rstrip().endswith("data: [DONE]"), text


@pytest.mark.parametrize("examples_per_case", [30, pytest.param(260, marks=pytest.mark.slow)])
def test_schemathesis_finds_no_server_error(base_url, engine, examples_per_case):
    """Examples per (operation, positive/negative): 4 x 260 bodies + the GETs > 1,000."""
    openapi = httpx.get(f"{base_url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(openapi)
    statuses: collections.Counter = collections.Counter()
    failures = []

    def fuzz(operation, mode: GenerationMode) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples_per_case, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(base_url=base_url, timeout=60)
            statuses[(operation.path, mode.value, response.status_code)] += 1
            try:
                content_type = response.headers.get("content-type", [""])[0]
                check_response(response.status_code, content_type, response.text)
            except (AssertionError, ValueError, KeyError) as err:
                failures.append((operation.path, case.body, response.status_code, str(err)))
        run()

    for result in schema.get_all_operations():
        operation = result.ok()
        fuzz(operation, GenerationMode.POSITIVE)
        if operation.body:  # nothing to violate in a parameterless GET
            fuzz(operation, GenerationMode.NEGATIVE)
    num_requests = sum(statuses.values())
    by_status: collections.Counter = collections.Counter()
    for (_, _, status), count in statuses.items():
        by_status[status] += count
    num_5xx = sum(count for status, count in by_status.items() if status >= 500)
    print(f"\nschemathesis: {num_requests} requests, {num_5xx} 5xx, by status "
          f"{dict(sorted(by_status.items()))}")
    assert not failures, failures[:5]
    assert num_requests >= 4 * examples_per_case * 0.9
    assert {path for path, _, _ in statuses} == set(openapi["paths"])
    assert httpx.get(f"{base_url}/health").status_code == 200
    wait_idle(engine, timeout=60)


HUGE = 10 ** 30
COMPLETION = {"prompt": "Hello", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def raw(text: str) -> bytes:
    return text.encode()


BAD_INPUT = [
    # malformed JSON
    ("completions", b'{"prompt": "Hello",', None),
    ("completions", b"{prompt: Hello}", None),
    ("completions", b"null", None),
    ("completions", b'"a string"', None),
    ("completions", b'{"prompt": "Hello"} trailing', None),
    ("completions", b"[" * 100_000, None),
    # wrong types
    ("completions", {**COMPLETION, "prompt": 5}, "prompt"),
    ("completions", {**COMPLETION, "max_tokens": "ten"}, "max_tokens"),
    ("completions", {**COMPLETION, "temperature": [1]}, "temperature"),
    ("completions", {**COMPLETION, "stream": [1]}, "stream"),
    ("completions", {**COMPLETION, "stop": 3}, "stop"),
    ("completions", {**COMPLETION, "logit_bias": [1]}, "logit_bias"),
    ("chat/completions", {**CHAT, "messages": [{"role": 1, "content": "Hi"}]}, "messages"),
    ("chat/completions", {**CHAT, "messages": [["user", "Hi"]]}, "messages"),
    # missing fields
    ("completions", {"max_tokens": 4}, "prompt"),
    ("chat/completions", {"max_tokens": 4}, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"content": "Hi"}]}, "messages"),
    # negative, NaN and huge numbers
    ("completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
    ("completions", raw('{"prompt": "Hello", "temperature": NaN}'), "temperature"),
    ("completions", raw('{"prompt": "Hello", "top_p": Infinity}'), "top_p"),
    ("completions", raw('{"prompt": "Hello", "presence_penalty": -Infinity}'),
     "presence_penalty"),
    ("completions", {**COMPLETION, "max_tokens": HUGE}, "max_tokens"),
    ("completions", {**COMPLETION, "seed": HUGE}, "seed"),
    ("completions", {**COMPLETION, "seed": -HUGE}, "seed"),
    ("completions", {**COMPLETION, "temperature": 1e308 * 10}, "temperature"),
    ("completions", {**COMPLETION, "frequency_penalty": -1e300}, "frequency_penalty"),
    ("completions", {**COMPLETION, "logit_bias": {"5": 1e300}}, "logit_bias"),
    ("completions", {**COMPLETION, "min_tokens": HUGE}, "min_tokens"),
    ("completions", {**COMPLETION, "stop_token_ids": [HUGE]}, "stop_token_ids"),
    ("completions", {**COMPLETION, "prompt": [HUGE]}, "prompt"),
    # empty and huge prompts
    ("completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("completions", {**COMPLETION, "prompt": ["Hello", ""]}, "prompt"),
    ("completions", {**COMPLETION, "prompt": "Hello " * 200_000}, "prompt"),
    ("completions", {**COMPLETION, "prompt": [5] * 100_000}, "prompt"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi " * 100_000}]},
     "messages"),
    # invalid UTF-8 and lone surrogates
    ("completions", b'{"prompt": "\xff\xfe Hello", "max_tokens": 4}', None),
    ("completions", b"\xff\xfe\xfd", None),
    ("completions", raw('{"prompt": "\\ud800 Hello", "max_tokens": 4}'), "prompt"),
    ("completions", raw('{"prompt": "Hello", "stop": ["\\udfff"]}'), "stop"),
    ("chat/completions", raw('{"messages": [{"role": "user", "content": "\\ud800"}]}'),
     "messages"),
    # max_tokens beyond the context
    ("completions", {**COMPLETION, "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 10 ** 6}, "max_tokens"),
    # n = 0, negative and huge
    ("completions", {**COMPLETION, "n": 0}, "n"),
    ("completions", {**COMPLETION, "n": -1}, "n"),
    ("completions", {**COMPLETION, "n": MAX_NUM_SEQS + 1}, "n"),
    ("completions", {**COMPLETION, "n": HUGE}, "n"),
    ("chat/completions", {**CHAT, "n": 10 ** 9}, "n"),
    # logprobs out of range
    ("completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("completions", {**COMPLETION, "logprobs": -1}, "logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.parametrize("path, body, param", BAD_INPUT,
                         ids=[f"{i}-{path}" for i, (path, _, _) in enumerate(BAD_INPUT)])
def test_bad_input_is_a_400_naming_the_parameter(base_url, path, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{base_url}/v1/{path}", content=content, timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["type"] == "invalid_request_error"
    assert error["param"] == param, error


@pytest.mark.parametrize("path, body", [
    ("completions", {**COMPLETION, "unknown_field": {"nested": [1, 2]}, "temperature": 0}),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi", "x": 1}],
                          "functions": None}),
    ("completions", {**COMPLETION, "top_k": HUGE}),
    ("completions", {**COMPLETION, "prompt": [0, 1, 2], "echo": True, "logprobs": 20}),
])
def test_odd_but_valid_input_is_served(base_url, engine, path, body):
    response = httpx.post(f"{base_url}/v1/{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
    wait_idle(engine)


@pytest.mark.parametrize("method, path", [("GET", "/v1/completions"),
                                          ("DELETE", "/v1/models"), ("POST", "/health")])
def test_a_wrong_method_is_a_405_not_a_crash(base_url, method, path):
    response = httpx.request(method, f"{base_url}{path}")
    assert response.status_code == 405
    assert set(response.json()["error"]) == ERROR_FIELDS
