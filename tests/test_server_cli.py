"""The server as a user starts it: `python -m engine.entrypoints.openai` in a process
of its own, loaded by `pagedllm bench serve`; `pagedllm serve` refusing bad flags."""

import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)

from engine.cli import main as pagedllm

API_KEY = "sk-cli-key"
SERVED_NAME = "tiny-cli"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tiny_model_factory):  # noqa: F811
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.entrypoints.openai", str(tiny_model_factory("llama")),
         "--device", "cpu", "--port", str(port), "--served-model-name", SERVED_NAME,
         "--api-key", API_KEY, "--max-model-len", "128", "--num-gpu-blocks-override", "128",
         "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny matmuls: threads only contend
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, f"server exited: {process.stdout.read()}"
            assert time.monotonic() < deadline, "server did not come up in 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def test_served_name_and_api_key(server_url):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server_url}/v1/models").status_code == 401
    models = httpx.get(f"{server_url}/v1/models", headers=headers).json()["data"]
    assert [m["id"] for m in models] == [SERVED_NAME]
    assert models[0]["max_model_len"] == 128


def test_bench_serve_reports_throughput_and_latencies(server_url, capsys):
    assert pagedllm(["bench", "serve", "--base-url", server_url, "--num-prompts", "6",
                     "--request-rate", "20", "--input-len", "6", "--output-len", "5",
                     "--api-key", API_KEY]) == 0
    report = capsys.readouterr().out
    rows = dict(re.findall(r"^(.+?):\s+(\S+)$", report, re.MULTILINE))
    assert rows["Successful requests"] == "6" and rows["Failed requests"] == "0"
    assert rows["Total generated tokens"] == "30"
    for row in ("Request throughput (req/s)", "Output token throughput (tok/s)",
                "Mean TTFT (ms)", "P50 TTFT (ms)", "P90 TTFT (ms)", "P99 TTFT (ms)",
                "Mean ITL (ms)", "P50 ITL (ms)", "P90 ITL (ms)", "P99 ITL (ms)"):
        assert float(rows[row]) > 0, row


def test_bench_serve_counts_failures(server_url, capsys):
    assert pagedllm(["bench", "serve", "--base-url", server_url, "--num-prompts", "2",
                     "--input-len", "2", "--output-len", "2", "--model", SERVED_NAME]) == 0
    report = capsys.readouterr().out
    assert re.search(r"^Failed requests:\s+2$", report, re.MULTILINE)
    assert "HTTP 401" in report


def test_serve_rejects_a_missing_model_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine.cli", "serve",
                             str(tmp_path / "missing"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "model" in result.stderr and "missing" in result.stderr


def test_serve_rejects_a_bad_max_num_waiting_before_loading_the_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine.cli", "serve",
                             str(tmp_path / "missing"), "--device", "cpu",
                             "--max-num-waiting", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "max_num_waiting" in result.stderr and "missing" not in result.stderr
