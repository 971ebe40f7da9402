"""Shared by the server tests: fixtures serving a tiny model with uvicorn on a free
loopback port (import them into a test module, with tiny_model_factory), starting
an engine of one's own, waiting for an engine to drain, and /metrics scraping."""

import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.entrypoints.openai.api_server import build_app

MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 128
NUM_BLOCKS = 192


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama")


def start_engine(model_dir, max_num_waiting=None, **config) -> AsyncLLMEngine:
    """The model on CPU in float32 (in bfloat16 greedy picks depend on the batch: logits
    tie), with `config`'s EngineConfig fields."""
    return AsyncLLMEngine.from_config(EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", **config), max_num_waiting)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = start_engine(model_dir, max_model_len=MAX_MODEL_LEN,
                          num_gpu_blocks_override=NUM_BLOCKS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def base_url(engine):
    """The app serving `engine` (a test module may define its own engine fixture)."""
    with serve(build_app(engine, [MODEL_NAME])) as url:
        yield url


@contextlib.contextmanager
def serve(app):
    """Run `app` with uvicorn on a free loopback port in a thread -> base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_idle(engine: AsyncLLMEngine, timeout: float = 10.0) -> None:
    """Wait until no request is in flight and every KV block is free."""
    kv = engine.engine.kv_cache_manager
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.engine.has_unfinished_requests() \
                and kv.num_free_blocks == kv.num_blocks:
            return
        time.sleep(0.01)
    pytest.fail(f"not idle after {timeout} s: {engine.engine.get_num_unfinished_requests()} "
                f"requests, {kv.num_free_blocks}/{kv.num_blocks} free blocks")


def scrape(base_url: str) -> dict:
    """/metrics parsed: (sample name, frozenset of labels) -> value."""
    text = httpx.get(f"{base_url}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset({"model_name": MODEL_NAME, **labels}.items()))]
