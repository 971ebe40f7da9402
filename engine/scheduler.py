"""Continuous batching: which requests run this step, with how many tokens each.

Every step `schedule()` first gives each RUNNING request (in admission order) its
remaining tokens: one for a decode, the rest of the prompt (chunked to the token
budget) for a prefill in progress. If a running request cannot get a block, the
running request with the highest (priority, arrival_time) is preempted by
recompute: its blocks are freed and it goes back to the front of the waiting
queue. Then, if nothing was preempted, WAITING requests are admitted in FCFS
order while the token budget, `max_num_seqs` and the KV pool allow, starting after
their prefix-cache hit (which never covers the last token). With chunked prefill
off, a prompt is admitted only when it fits the remaining budget whole.

`num_computed_tokens` advances in `update_from_output`: while the runner executes
a step, request `r` computes `r.all_token_ids[r.num_computed_tokens:][:n]` with
`n = num_scheduled_tokens[r.request_id]`.

Multi-step decode (`num_decode_steps` > 1): when nothing waits and every running
request is decoding and `decode_ahead` (its tokens need no host work between steps:
final output only, no stop strings or per-token logits processing), one schedule
covers up to `num_decode_steps` decode steps. Request `r` then gets `n` > 1 tokens
of which only the first is known: the runner feeds each step's sampled token to the
next, and `r` receives `n` sampled tokens (fewer once a stop condition ends it).
`SchedulerOutput.decode_steps` is the largest `n`; the host's per-step work is
spread over all of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    num_decode_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "num_decode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class SchedulerOutput:
    """One step. `block_copies` ((src_block_id, dst_block_id)) must be performed
    before the forward pass; `finished_request_ids` lists requests that finished or
    were aborted since the previous step, so the runner can drop their state."""

    scheduled_requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    #: > 1: a multi-step decode (module docstring); each request's first token is known
    decode_steps: int = 1

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_request_ids: list[str] = []

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError if it could never be scheduled."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self._check_fits(request)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def fork_request(self, parent: Request, child: Request) -> None:
        """Add `child`, whose tokens start with the parent's computed tokens.

        A running parent's blocks are shared (copy-on-write) and the child joins
        RUNNING with the parent's `num_computed_tokens`; otherwise the child waits
        and recomputes, helped by the prefix cache.
        """
        if child.request_id in self.requests:
            raise ValueError(f"request_id {child.request_id!r} is already in use")
        num_shared = parent.num_computed_tokens
        if child.all_token_ids[:num_shared] != parent.all_token_ids[:num_shared]:
            raise ValueError("child.all_token_ids must start with the parent's tokens")
        self._check_fits(child)
        self.requests[child.request_id] = child
        if parent.status != RequestStatus.RUNNING or num_shared == 0:
            child.status = RequestStatus.WAITING
            self.waiting.append(child)
            return
        self.kv_cache_manager.fork(parent, child)
        child.num_computed_tokens = num_shared
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def finish_requests(self, request_ids: str | list[str], status: RequestStatus) -> None:
        """Finish (e.g. abort) requests; unknown or finished ids are ignored."""
        if not RequestStatus.is_finished(status):
            raise ValueError(f"status must be a FINISHED_* status, got {status!r}")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._release(request)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(finished_request_ids=self._finished_request_ids)
        self._finished_request_ids = []
        budget = self._schedule_running(output, self._decode_lookahead())
        if not output.preempted_request_ids:
            self._schedule_waiting(output, budget)
        output.block_copies = self.kv_cache_manager.take_block_copies()
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]
    ) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish stopped requests.

        Returns the requests that got tokens this step, finished ones included.
        """
        updated, finished = [], []
        num_scheduled_tokens = scheduler_output.num_scheduled_tokens
        for request in scheduler_output.scheduled_requests:
            if request.is_finished():
                continue  # aborted between schedule() and now
            request_id = request.request_id
            request.num_computed_tokens += num_scheduled_tokens[request_id]
            new_token_ids = sampled_token_ids.get(request_id)
            if not new_token_ids:
                continue
            for token_id in new_token_ids:
                request.append_output_token_ids(token_id)
                if self._check_stop(request, token_id):
                    finished.append(request)
                    break
            # A multi-step decode cut short by a stop computed positions past the last
            # kept token; only those before it hold its tokens' KV.
            request.num_computed_tokens = min(request.num_computed_tokens,
                                              request.num_tokens - 1)
            updated.append(request)
        if finished:
            done = set(map(id, finished))
            self.running = [r for r in self.running if id(r) not in done]
            for request in finished:
                self._release(request)
        return updated

    def _decode_lookahead(self) -> int:
        """Decode steps past the first this schedule may cover (module docstring)."""
        if self.config.num_decode_steps == 1 or self.waiting or not self.running:
            return 0
        for request in self.running:
            if not request.decode_ahead or request.num_tokens - request.num_computed_tokens != 1:
                return 0
        return self.config.num_decode_steps - 1

    def _schedule_running(self, output: SchedulerOutput, lookahead: int) -> int:
        """Schedule running requests, preempting as needed; returns the budget left."""
        budget = self.config.max_num_batched_tokens
        for request in list(self.running):
            if budget == 0 or len(output.scheduled_requests) == self.config.max_num_seqs:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            num_ahead = self._tokens_ahead(request, lookahead, budget - num_new_tokens)
            while self.kv_cache_manager.allocate_slots(
                    request, num_new_tokens, num_lookahead_tokens=num_ahead) is None:
                victim = max(
                    reversed(self.running), key=lambda r: (r.priority, r.arrival_time)
                )
                budget += self._preempt(victim, output)
                if victim is request:
                    break
            else:
                num_new_tokens += num_ahead
                output.scheduled_requests.append(request)
                output.num_scheduled_tokens[request.request_id] = num_new_tokens
                if lookahead:
                    output.decode_steps = max(output.decode_steps, num_new_tokens)
                budget -= num_new_tokens
        return budget

    def _tokens_ahead(self, request: Request, lookahead: int, budget: int) -> int:
        """Of `lookahead` steps, those the request can still use: its max_tokens and the
        model length end it (each step appends a token), the token budget bounds them."""
        if lookahead == 0:
            return 0
        can_append = self.config.max_model_len - request.num_tokens
        if request.max_tokens is not None:
            can_append = min(can_append, request.max_tokens - request.num_output_tokens)
        return max(0, min(lookahead, can_append - 1, budget))

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        kv = self.kv_cache_manager
        while self.waiting and budget > 0 and (
            len(self.running) < self.config.max_num_seqs
            and len(output.scheduled_requests) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            computed_blocks, num_cached = kv.get_computed_blocks(request)
            num_new_tokens = request.num_tokens - num_cached
            if num_new_tokens > budget:
                if not self._may_chunk(num_new_tokens):
                    break
                num_new_tokens = budget
            if kv.allocate_slots(request, num_new_tokens, computed_blocks) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.scheduled_requests.append(request)
            output.num_scheduled_tokens[request.request_id] = num_new_tokens
            budget -= num_new_tokens

    def _may_chunk(self, num_new_tokens: int) -> bool:
        """Without chunked prefill only a recompute longer than the whole budget
        (a preempted request with a long output) is split, else it could never run."""
        return (
            self.config.enable_chunked_prefill
            or num_new_tokens > self.config.max_num_batched_tokens
        )

    def _preempt(self, request: Request, output: SchedulerOutput) -> int:
        """Preempt by recompute; returns the tokens it had scheduled this step."""
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        output.preempted_request_ids.append(request.request_id)
        num_tokens = output.num_scheduled_tokens.pop(request.request_id, 0)
        if num_tokens:
            output.scheduled_requests.remove(request)
        return num_tokens

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """Apply the stop conditions after `token_id` was appended."""
        num_output_tokens = len(request.output_token_ids)
        if num_output_tokens >= request.min_tokens:
            if token_id == request.eos_token_id and not request.ignore_eos:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if token_id in request.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
        max_tokens = request.max_tokens
        if (
            max_tokens is not None and num_output_tokens >= max_tokens
        ) or len(request.all_token_ids) >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _check_fits(self, request: Request) -> None:
        """ValueError unless the request can run alone in the whole pool."""
        config, kv = self.config, self.kv_cache_manager
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError(f"prompt_token_ids of {request.request_id!r} is empty")
        if num_prompt > config.max_model_len:
            raise ValueError(
                f"prompt_token_ids has {num_prompt} tokens, more than "
                f"max_model_len={config.max_model_len}"
            )
        if not config.enable_chunked_prefill and num_prompt > config.max_num_batched_tokens:
            raise ValueError(
                f"prompt_token_ids has {num_prompt} tokens, more than "
                f"max_num_batched_tokens={config.max_num_batched_tokens} "
                "and chunked prefill is off"
            )
        max_tokens = request.max_tokens
        max_len = config.max_model_len
        if max_tokens is not None:
            max_len = min(max_len, num_prompt + max_tokens)
        if cdiv(max_len, kv.block_size) > kv.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} needs up to {max_len} tokens of KV "
                f"cache (prompt_token_ids + max_tokens), more than the "
                f"{kv.num_blocks} blocks x {kv.block_size} slots of the whole pool"
            )

    def _release(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._finished_request_ids.append(request.request_id)
