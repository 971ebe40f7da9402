"""`pagedllm bench serve`: load-test a running OpenAI-compatible server.

Sends `--num-prompts` streaming /v1/completions requests whose arrivals form a
Poisson process of `--request-rate` requests/s (inf: all at once), each a
random prompt of `--input-len` words asking for exactly `--output-len` tokens
(ignore_eos), and prints request and token throughput, time to first token
(TTFT) and inter-token latency (ITL, the gap between streamed chunks) as
mean/p50/p90/p99. Token counts come from the server's usage report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

_WORDS = ("the of and to in is was for on that with as by at from his it an were are which "
          "this be or has had not but its first new after one two time who all there also "
          "city year can been more people other world state when made part into where most "
          "over work some such school family many these house under while between").split()
_RULE_WIDTH = 50


def add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks",
                                   description="Benchmarks of a running pagedllm.")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    serve = benchmarks.add_parser(
        "serve", help="load-test an OpenAI-compatible server",
        description="Stream completions from a server at a given request rate and report "
                    "throughput, TTFT and ITL.")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000",
                       help="the server, without /v1")
    serve.add_argument("--model", default=None, help="default: the server's first model")
    serve.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    serve.add_argument("--request-rate", type=float, default=float("inf"),
                       help="requests per second, Poisson arrivals; inf = all at once")
    serve.add_argument("--input-len", type=int, default=128, help="words per prompt")
    serve.add_argument("--output-len", type=int, default=128, help="tokens per completion")
    serve.add_argument("--api-key", default=None, help="bearer token of the server")
    serve.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    serve.set_defaults(func=run_bench_serve)


@dataclass
class RequestResult:
    ok: bool = False
    error: Optional[str] = None
    ttft: Optional[float] = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def run_bench_serve(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(args, name)}")
    if not args.request_rate > 0:
        raise ValueError(f"request_rate must be > 0, got {args.request_rate}")
    results, duration = asyncio.run(_benchmark(args))
    print(format_report(results, duration))


async def _benchmark(args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    import httpx

    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers,
                                 timeout=None, limits=limits) as client:
        model = args.model or await _first_model(client)
        start = time.perf_counter()
        tasks = []
        for _ in range(args.num_prompts):
            prompt = " ".join(rng.choice(_WORDS) for _ in range(args.input_len))
            tasks.append(asyncio.create_task(
                _one_request(client, model, prompt, args.output_len)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


async def _first_model(client) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _one_request(client, model: str, prompt: str, output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.completion_tokens = chunk["usage"]["completion_tokens"]
                elif any(choice.get("text") for choice in chunk["choices"]):
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
    except Exception as err:  # a failed request is reported, not fatal to the run
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.ok = True
    return result


def format_report(results: list[RequestResult], duration: float) -> str:
    done = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.completion_tokens for r in done)
    rows = [
        ("Successful requests", f"{len(done)}"),
        ("Failed requests", f"{len(results) - len(done)}"),
        ("Benchmark duration (s)", f"{duration:.2f}"),
        ("Total input tokens", f"{prompt_tokens}"),
        ("Total generated tokens", f"{output_tokens}"),
        ("Request throughput (req/s)", f"{len(done) / duration:.2f}"),
        ("Output token throughput (tok/s)", f"{output_tokens / duration:.2f}"),
        ("Total token throughput (tok/s)", f"{(prompt_tokens + output_tokens) / duration:.2f}"),
    ]
    lines = [" Serving Benchmark Result ".center(_RULE_WIDTH, "=")]
    lines += [f"{name + ':':<40}{value:>10}" for name, value in rows]
    for title, short, values in (
            ("Time to First Token", "TTFT", [r.ttft for r in done if r.ttft is not None]),
            ("Inter-token Latency", "ITL", [itl for r in done for itl in r.itls])):
        lines.append(f" {title} ".center(_RULE_WIDTH, "-"))
        lines += [f"{name + ':':<40}{value:>10}" for name, value in _latency_rows(short, values)]
    errors = sorted({r.error for r in results if r.error})
    lines.append("=" * _RULE_WIDTH)
    lines += [f"error: {error}" for error in errors[:5]]
    return "\n".join(lines)


def _latency_rows(short: str, values: list[float]) -> list[tuple[str, str]]:
    if not values:
        return [(f"Mean {short} (ms)", "n/a")]
    millis = np.asarray(values) * 1000.0
    rows = [(f"Mean {short} (ms)", f"{millis.mean():.2f}")]
    rows += [(f"P{q} {short} (ms)", f"{np.percentile(millis, q):.2f}") for q in (50, 90, 99)]
    return rows
