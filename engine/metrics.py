"""Prometheus metrics of one server, under vLLM's names so its dashboards work unchanged.

Every series carries a `model_name` label. Each `ServerMetrics` owns a private
CollectorRegistry, so several servers can live in one process. prometheus_client
appends `_total` to counter names: the counter created as `vllm:prompt_tokens` is
exposed as `vllm:prompt_tokens_total`, as vLLM exposes it.
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

from engine.serving_stats import StepStats

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_FINISH_REASONS = ("stop", "length", "abort")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0, 300.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
                5.0, 10.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                    300.0, 600.0, 1800.0)


class ServerMetrics:
    """The vLLM metric set for `model_name`; `observe` is an AsyncLLMEngine step listener."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str):
            return Gauge(name, doc, ["model_name"], registry=self.registry).labels(**labels)

        def counter(name: str, doc: str):
            return Counter(name, doc, ["model_name"], registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(**labels)

        self.num_requests_running = gauge("vllm:num_requests_running",
                                          "Number of requests in the running batch.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting",
                                          "Number of requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc",
                                    "KV cache usage: fraction of blocks in use (1 = full).")
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self._model_name = model_name
        self.request_success = Counter("vllm:request_success", "Finished requests by reason.",
                                       ["model_name", "finished_reason"],
                                       registry=self.registry)
        for reason in _FINISH_REASONS:  # listed at 0 before the first request finishes
            self.request_success.labels(model_name, reason)
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS)
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to finish of a request.",
            _REQUEST_BUCKETS)
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds", "Time a request waited before its first step.",
            _REQUEST_BUCKETS)

    def observe(self, stats: StepStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        for value in stats.time_to_first_tokens:
            self.time_to_first_token.observe(value)
        for value in stats.inter_token_latencies:
            self.inter_token_latency.observe(value)
        for value in stats.queue_times:
            self.request_queue_time.observe(value)
        for finished in stats.finished:
            self.request_success.labels(self._model_name, finished.finish_reason).inc()
            self.e2e_request_latency.observe(finished.e2e_latency)

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
