"""The server under bad input, impatient clients and scrapers.

Every bad request gets its status code and an OpenAI error body naming the
parameter, and the server answers normally afterwards; a client that leaves
gets its request aborted and its KV blocks freed; /metrics parses and moves.
"""

import importlib.metadata
import time

import httpx
import openai
import pytest
from server_harness import base_url, engine, model_dir  # noqa: F401  (fixtures)
from server_harness import MAX_MODEL_LEN, MODEL_NAME, metric, scrape, serve, wait_idle
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)
from transformers import AutoTokenizer

from engine.entrypoints.openai.api_server import build_app

API_KEY = "sk-test-key"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def keyed_url(engine):  # noqa: F811
    """A second server on the same engine that wants API_KEY."""
    with serve(build_app(engine, [MODEL_NAME], api_key=API_KEY)) as url:
        yield url


def assert_error(response: httpx.Response, status: int, param) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


def assert_still_serving(base_url: str) -> None:
    response = httpx.post(f"{base_url}/v1/completions", json=COMPLETION, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path, body, status, param", [
    ("completions", {"temperature": -1}, 400, "temperature"),
    ("completions", {"temperature": "hot"}, 400, "temperature"),
    ("completions", {"top_p": 0}, 400, "top_p"),
    ("completions", {"top_k": -2}, 400, "top_k"),
    ("completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"n": 0}, 400, "n"),
    ("completions", {"logprobs": 21}, 400, "logprobs"),
    ("completions", {"min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ("completions", {"presence_penalty": 3}, 400, "presence_penalty"),
    ("completions", {"stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("completions", {"stop_token_ids": [10 ** 6]}, 400, "stop_token_ids"),
    ("completions", {"logit_bias": {"1000000": 1.0}}, 400, "logit_bias"),
    ("completions", {"logit_bias": {"one": 1.0}}, 400, "logit_bias"),
    ("completions", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {"prompt": None}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": [[]]}, 400, "prompt"),
    ("completions", {"prompt": [5, 10 ** 6]}, 400, "prompt"),
    ("completions", {"model": "gpt-4"}, 404, "model"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"content": "Hi"}]}, 400, "messages"),
    ("chat/completions", {"messages": "Hi"}, 400, "messages"),
    ("chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"max_completion_tokens": -1}, 400, "max_tokens"),
    ("chat/completions", {"model": "gpt-4"}, 404, "model"),
])
def test_bad_request_gets_an_openai_error_and_the_server_goes_on(base_url, path, body,
                                                                 status, param):
    request = {**(CHAT if path.startswith("chat") else COMPLETION), **body}
    response = httpx.post(f"{base_url}/v1/{path}", json=request, timeout=60)
    assert_error(response, status, param)
    assert_still_serving(base_url)


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_a_prompt_longer_than_max_model_len_names_both_lengths(base_url, model_dir, path):
    text = "Hello, how are you? " * 30
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if path == "completions":
        body, param, num_tokens = {"prompt": text}, "prompt", len(tokenizer.encode(text))
    else:
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        body, param = {"messages": messages}, "messages"
        num_tokens = len(tokenizer.encode(rendered, add_special_tokens=False))
    assert num_tokens > MAX_MODEL_LEN
    error = assert_error(httpx.post(f"{base_url}/v1/{path}", json=body, timeout=60), 400, param)
    assert str(num_tokens) in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    assert_still_serving(base_url)


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]"])
def test_a_body_that_is_not_a_request_is_a_400(base_url, content):
    response = httpx.post(f"{base_url}/v1/completions", content=content,
                          headers={"Content-Type": "application/json"})
    assert_error(response, 400, None)
    assert_still_serving(base_url)


def test_an_unknown_route_is_an_openai_404(base_url):
    assert_error(httpx.get(f"{base_url}/v1/nothing"), 404, None)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": API_KEY}])
def test_api_key_is_required_on_v1_routes(keyed_url, headers):
    for path, body in (("completions", COMPLETION), ("chat/completions", CHAT)):
        error = assert_error(httpx.post(f"{keyed_url}/v1/{path}", json=body, headers=headers),
                             401, None)
        assert error["code"] == "invalid_api_key"
    assert_error(httpx.get(f"{keyed_url}/v1/models", headers=headers), 401, None)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="wrong",
                      max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(model=MODEL_NAME, **COMPLETION).usage.completion_tokens
    for open_path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{keyed_url}{open_path}").status_code == 200


def test_health_and_version(base_url):
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.get(f"{base_url}/version").json() == {
        "version": importlib.metadata.version("pagedllm")}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_gets_its_request_aborted(base_url, engine, stream):
    """Steps are slowed to >= 20 ms, so the 100 tokens asked for would take >= 2 s:
    only an abort can drain the engine within the 1.5 s allowed."""
    wait_idle(engine)
    engine.add_step_listener(slow_step)
    before = scrape(base_url)
    body = {"prompt": "Hi", "max_tokens": 100, "ignore_eos": True, "stream": stream}
    try:
        if stream:
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert sum(1 for _, line in zip(range(3), filter(None, lines))) == 3
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base_url}/v1/completions", json=body, timeout=0.5)
        wait_idle(engine, timeout=1.5)
    finally:
        engine.remove_step_listener(slow_step)
    after = scrape(base_url)
    name = "vllm:request_success_total"
    assert metric(after, name, finished_reason="abort") \
        == metric(before, name, finished_reason="abort") + 1
    assert metric(after, name, finished_reason="length") \
        == metric(before, name, finished_reason="length")
    assert_still_serving(base_url)


def slow_step(_stats) -> None:
    time.sleep(0.02)


VLLM_SAMPLES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"]


def test_metrics_parse_and_count_what_was_served(base_url, engine):
    wait_idle(engine)
    before = scrape(base_url)
    assert {name for name, _ in before} >= set(VLLM_SAMPLES)
    assert all(dict(labels)["model_name"] == MODEL_NAME
               for name, labels in before if name.startswith("vllm:"))
    prompt = "PagedAttention stores the key and value cache in fixed-size blocks. " * 2
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    usages = [client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5,
                                        extra_body={"ignore_eos": True}).usage
              for _ in range(2)]
    after = scrape(base_url)

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("vllm:generation_tokens_total") == 10
    assert moved("vllm:request_success_total", finished_reason="length") == 2
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert moved(f"vllm:{histogram}_seconds_count") == 2
    assert moved("vllm:inter_token_latency_seconds_count") == 2 * 4
    assert moved("vllm:prefix_cache_queries_total") == sum(u.prompt_tokens for u in usages)
    assert moved("vllm:prefix_cache_hits_total") >= 16  # the second prompt's full blocks
    assert metric(after, "vllm:num_requests_running") == 0
    assert metric(after, "vllm:kv_cache_usage_perc") == 0.0


def test_metrics_count_every_sample_of_a_request(base_url, engine):
    """n samples of one prompt: one request, one prefill, n x max_tokens generated tokens."""
    wait_idle(engine)
    before = scrape(base_url)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    usage = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=5, n=3,
                                      extra_body={"ignore_eos": True}).usage
    after = scrape(base_url)

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert usage.completion_tokens == 15
    assert moved("vllm:generation_tokens_total") == 15
    assert moved("vllm:prompt_tokens_total") == usage.prompt_tokens
    assert moved("vllm:request_success_total", finished_reason="length") == 1
    assert moved("vllm:time_to_first_token_seconds_count") == 1
