"""What the async engine reports after every step: engine gauges and request latencies.

`StatsTracker` lives on the engine thread. It keeps the timestamps of every
in-flight request (time.monotonic() seconds) and turns each step's outputs into
one `StepStats`, which listeners such as the Prometheus metrics consume. Counts
in a StepStats are increments since the previous one, gauges are current values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.outputs import RequestOutput
from engine.request import RequestStatus


@dataclass
class FinishedRequest:
    finish_reason: str          # "stop", "length" or "abort"
    e2e_latency: float          # arrival -> finish, seconds
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class StepStats:
    # gauges, taken after the step
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0     # fraction of KV blocks owned by requests, 0..1
    num_free_blocks: int = 0
    # increments since the previous StepStats
    num_steps: int = 0
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0      # of which found cached
    num_prompt_tokens: int = 0      # prompts whose prefill completed
    num_generation_tokens: int = 0
    queue_times: list[float] = field(default_factory=list)
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)


@dataclass
class _RequestTimes:
    arrival_time: float
    scheduled: bool = False
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class StatsTracker:
    """Per-request timestamps -> StepStats. Not thread-safe: engine thread only."""

    def __init__(self, engine):
        self._engine = engine
        self._requests: dict[str, _RequestTimes] = {}
        self._prefix_cache_seen = self._prefix_cache_totals()
        self._pending = StepStats()

    def add_request(self, request_id: str, arrival_time: float) -> None:
        self._requests[request_id] = _RequestTimes(arrival_time)

    def abort_request(self, request_id: str, now: float) -> None:
        times = self._requests.pop(request_id, None)
        if times is not None:
            self._pending.finished.append(FinishedRequest(
                "abort", now - times.arrival_time, times.num_prompt_tokens,
                times.num_generation_tokens))

    def record_step(self, step_start: float, now: float,
                    outputs: list[RequestOutput]) -> None:
        """Account one engine step that began at `step_start` and produced `outputs`."""
        self._pending.num_steps += 1
        self._mark_scheduled(step_start)
        for output in outputs:
            times = self._requests.get(output.request_id)
            if times is not None:
                self._record_output(times, output, now)

    def take(self) -> StepStats:
        """The increments since the last take, with the engine's current gauges."""
        stats, self._pending = self._pending, StepStats()
        scheduler, kv = self._engine.scheduler, self._engine.kv_cache_manager
        stats.num_running, stats.num_waiting = scheduler.num_running, scheduler.num_waiting
        stats.kv_cache_usage, stats.num_free_blocks = kv.usage, kv.num_free_blocks
        queries, hits = self._prefix_cache_totals()
        stats.prefix_cache_queries = queries - self._prefix_cache_seen[0]
        stats.prefix_cache_hits = hits - self._prefix_cache_seen[1]
        self._prefix_cache_seen = (queries, hits)
        return stats

    def _prefix_cache_totals(self) -> tuple[int, int]:
        kv = self._engine.kv_cache_manager
        return kv.prefix_cache_queries, kv.prefix_cache_hits

    def _mark_scheduled(self, step_start: float) -> None:
        """Queue time ends at the start of the first step that computed any of a request."""
        scheduler_requests = self._engine.scheduler.requests
        for request_id, times in self._requests.items():
            if times.scheduled:
                continue
            request = scheduler_requests.get(request_id)
            if request is None or request.status != RequestStatus.WAITING \
                    or request.num_computed_tokens > 0:
                times.scheduled = True
                self._pending.queue_times.append(step_start - times.arrival_time)

    def _record_output(self, times: _RequestTimes, output: RequestOutput, now: float) -> None:
        """Tokens count over all of a request's samples (n > 1); latencies are per sample:
        each new token of one sample since the last output shares the time between them."""
        num_tokens = sum(len(completion.token_ids) for completion in output.outputs)
        num_new = num_tokens - times.num_generation_tokens
        if num_new > 0:
            if times.first_token_time is None:
                times.first_token_time = now
                times.num_prompt_tokens = len(output.prompt_token_ids)
                self._pending.num_prompt_tokens += times.num_prompt_tokens
                self._pending.time_to_first_tokens.append(now - times.arrival_time)
            else:
                per_sample = max(num_new / len(output.outputs), 1.0)
                self._pending.inter_token_latencies.append(
                    (now - times.last_token_time) / per_sample)
            times.last_token_time = now
            times.num_generation_tokens = num_tokens
            self._pending.num_generation_tokens += num_new
        if output.finished:
            del self._requests[output.request_id]
            reason = output.outputs[0].finish_reason if output.outputs else None
            self._pending.finished.append(FinishedRequest(
                reason or "abort", now - times.arrival_time, len(output.prompt_token_ids),
                times.num_generation_tokens))
