"""Graceful shutdown: SIGTERM to a real `python -m engine.entrypoints.openai` process.

The server stops accepting connections at once; requests in flight either run
to completion (within --shutdown-timeout) or, past it, end with a clean error
(a 503 body, or an error event then [DONE] on a stream); the process exits 0.
In process: a draining engine answers new requests 503 and /health 503.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_harness import model_dir  # noqa: F401  (fixture)
from server_harness import MODEL_NAME, metric, scrape, serve, start_engine
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)

from engine.entrypoints.openai.api_server import build_app

NUM_STREAMS, NUM_PLAIN = 4, 2
MAX_TOKENS = 200  # hundreds of steps: still running when the signal comes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir, shutdown_timeout: float) -> tuple[subprocess.Popen, str]:  # noqa: F811
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.entrypoints.openai", str(model_dir), "--device", "cpu",
         "--port", str(port), "--served-model-name", MODEL_NAME, "--max-model-len", "256",
         "--num-gpu-blocks-override", "128", "--shutdown-timeout", str(shutdown_timeout),
         "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny matmuls: threads only contend
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not come up: {process.communicate()[0]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)


async def stream_events(client: httpx.AsyncClient, i: int) -> list[dict | str]:
    body = {"prompt": f"Hello {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        return [line[len("data: "):] if line == "data: [DONE]" else json.loads(line[6:])
                async for line in response.aiter_lines() if line]


async def plain(client: httpx.AsyncClient, i: int) -> httpx.Response:
    return await client.post("/v1/completions", json={
        "prompt": f"Hi {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True})


async def sigterm_mid_flight(process: subprocess.Popen, url: str):
    """Start the requests, SIGTERM once all are in the engine -> (streams, plains, refused)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        tasks = [asyncio.create_task(plain(client, i)) for i in range(NUM_PLAIN)]
        tasks += [asyncio.create_task(stream_events(client, i)) for i in range(NUM_STREAMS)]
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(in_flight, url) < NUM_STREAMS + NUM_PLAIN:
            assert time.monotonic() < deadline, "the requests never reached the engine"
        process.send_signal(signal.SIGTERM)
        refused = await asyncio.to_thread(connections_refused, url)
        results = await asyncio.gather(*tasks)
    return results[NUM_PLAIN:], results[:NUM_PLAIN], refused


def in_flight(url: str) -> float:
    samples = scrape(url)
    return metric(samples, "vllm:num_requests_running") + \
        metric(samples, "vllm:num_requests_waiting")


def connections_refused(url: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


def wait_exit(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(model_dir):  # noqa: F811
    process, url = start_server(model_dir, shutdown_timeout=60)
    streams, plains, refused = asyncio.run(sigterm_mid_flight(process, url))
    assert wait_exit(process, 60) == 0, process.stdout.read()
    assert refused, "the server still accepted connections after SIGTERM"
    for events in streams:
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in event for event in events[:-1])
    for response in plains:
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS


def test_past_the_shutdown_timeout_in_flight_requests_end_with_a_clean_error(
        model_dir):  # noqa: F811
    process, url = start_server(model_dir, shutdown_timeout=0)
    start = time.monotonic()
    streams, plains, refused = asyncio.run(sigterm_mid_flight(process, url))
    assert wait_exit(process, 30) == 0, process.stdout.read()
    assert time.monotonic() - start < 30
    assert refused
    for events in streams:
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert (error["type"], error["code"]) == ("server_error", "shutting_down")
    for response in plains:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "shutting_down"


def test_a_draining_engine_answers_503_and_fails_its_health_check(model_dir):  # noqa: F811
    engine = start_engine(model_dir, max_model_len=64, num_gpu_blocks_override=16)
    try:
        with serve(build_app(engine, [MODEL_NAME])) as url:
            assert httpx.get(f"{url}/health").status_code == 200
            engine.stop_accepting()
            assert httpx.get(f"{url}/health").status_code == 503
            for stream in (False, True):
                response = httpx.post(f"{url}/v1/completions", json={
                    "prompt": "Hi", "max_tokens": 2, "stream": stream})
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "shutting_down"
    finally:
        engine.shutdown()
