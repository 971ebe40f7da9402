"""Memory under an overload burst: the server with and without `--max-num-waiting`.

Starts `python -m engine.entrypoints.openai` on a tiny random Llama (built on
the fly, tests/tiny_models.py) once per setting and burst length, and sends it
completions over loopback at `--rate` requests/s, well above what it serves,
for each of `--durations` seconds (open loop: arrivals do not wait for answers).
Reports requests served (200) and refused (503 + Retry-After), the peak
waiting queue sampled from `vllm:num_requests_waiting`, the server's peak RSS
growth over its idle RSS, and the wall time. Unbounded, the queue and the
memory grow with the length of the burst; bounded, they stay flat. Every loop
is bounded in count and time.

    python benchmarks/reliability_overload.py --rate 200 --durations 5 15
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import build_tiny_model  # noqa: E402

STARTUP_TIMEOUT_S = 180
BURST_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: str, args, max_num_waiting: int | None):
    port = free_port()
    command = [sys.executable, "-m", "engine.entrypoints.openai", model_dir, "--device", "cpu",
               "--dtype", "float32", "--port", str(port), "--max-model-len", "256",
               "--max-num-seqs", str(args.max_num_seqs), "--uvicorn-log-level", "error"]
    if max_num_waiting is not None:
        command += ["--max-num-waiting", str(max_num_waiting)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not come up")


class Sampler(threading.Thread):
    """Polls the server's RSS and waiting queue until stopped (at most BURST_TIMEOUT_S)."""

    def __init__(self, process: subprocess.Popen, url: str):
        super().__init__(daemon=True)
        self.process, self.url = psutil.Process(process.pid), url
        self.peak_rss = self.process.memory_info().rss
        self.peak_waiting = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + BURST_TIMEOUT_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            try:
                text = httpx.get(f"{self.url}/metrics", timeout=5).text
            except httpx.TransportError:
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "vllm:num_requests_waiting":
                        self.peak_waiting = max(self.peak_waiting, sample.value)
            time.sleep(0.02)


async def burst(url: str, args, num_requests: int) -> dict[int, int]:
    """`num_requests` completions sent at `args.rate` per second -> count by status."""
    prompt = "The capital of France is Paris. " * (args.prompt_words // 6)
    # A fresh connection per request: a kept-alive one may be closed by the server's
    # keep-alive timeout just as the next request goes out on it.
    limits = httpx.Limits(max_connections=num_requests, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=BURST_TIMEOUT_S, limits=limits) as client:
        async def one() -> int:
            response = await client.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True})
            assert response.status_code in (200, 503), response.text
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) >= 1
            return response.status_code

        tasks = []
        for _ in range(num_requests):
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(1 / args.rate)
        statuses = await asyncio.gather(*tasks)
    return {status: statuses.count(status) for status in set(statuses)}


def measure(model_dir: str, args, max_num_waiting: int | None, num_requests: int) -> dict:
    process, url = start_server(model_dir, args, max_num_waiting)
    try:
        idle_rss = psutil.Process(process.pid).memory_info().rss
        sampler = Sampler(process, url)
        sampler.start()
        start = time.monotonic()
        statuses = asyncio.run(asyncio.wait_for(burst(url, args, num_requests),
                                                BURST_TIMEOUT_S))
        elapsed = time.monotonic() - start
        sampler.stop.set()
        sampler.join()
        return {"served": statuses.get(200, 0), "refused": statuses.get(503, 0),
                "peak_waiting": int(sampler.peak_waiting),
                "rss_growth_mib": (sampler.peak_rss - idle_rss) / 2**20, "seconds": elapsed}
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--durations", type=float, nargs="+", default=[5.0, 15.0],
                        help="burst lengths in seconds")
    parser.add_argument("--max-num-waiting", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        build_tiny_model(model_dir, "llama")
        for duration in args.durations:
            num_requests = int(args.rate * duration)
            for bound in (args.max_num_waiting, None):
                rows.append((num_requests, f"--max-num-waiting {bound}" if bound else "no bound",
                             measure(model_dir, args, bound, num_requests)))
    print(f"completions sent at {args.rate:.0f}/s, max_num_seqs {args.max_num_seqs}, "
          f"~{args.prompt_words}-word prompts, {args.max_tokens} tokens each")
    print(f"{'sent':>6}  {'setting':<24}{'served':>8}{'503':>8}{'peak waiting':>14}"
          f"{'RSS growth MiB':>16}{'seconds':>9}")
    for num_requests, name, row in rows:
        print(f"{num_requests:>6}  {name:<24}{row['served']:>8}{row['refused']:>8}"
              f"{row['peak_waiting']:>14}{row['rss_growth_mib']:>16.1f}{row['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
