"""Request state as the scheduler and the KV cache manager see it.

A request's token sequence is `all_token_ids = prompt_token_ids + output_token_ids`
(one list, appended in place). `num_computed_tokens` counts the leading tokens of
that sequence whose KV is in the cache; the scheduler advances it in
`Scheduler.update_from_output`, so during a step it still holds the value from
before the step. A preempted request drops its KV and recomputes from token 0.
"""

from __future__ import annotations

import enum
import time


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request; every value from FINISHED_STOPPED on is terminal."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_IGNORED = 6

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status >= RequestStatus.FINISHED_STOPPED


_FIRST_FINISHED = RequestStatus.FINISHED_STOPPED

_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    # An ignored request was too long for the model: OpenAI reports that as "length".
    RequestStatus.FINISHED_IGNORED: "length",
}


class Request:
    """One generation request.

    `sampling_params` is duck-typed: `.max_tokens` (None = up to the model length),
    `.ignore_eos`, `.stop_token_ids` (None or a list) and optionally `.min_tokens`.
    `priority`: a lower value is served first; under memory pressure the running
    request with the highest (priority, arrival_time) is preempted.
    `extra_keys`: anything besides the token ids that changes the KV of a block
    (e.g. a LoRA id); it is part of every prefix-cache block hash of this request.
    `stop_reason`: the stop token id or stop string that finished the request, or
    None (EOS, length, abort).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        *,
        extra_keys: tuple = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        # The stop rules, read from the params once: the scheduler checks them every token.
        self.max_tokens: int | None = sampling_params.max_tokens
        self.min_tokens: int = getattr(sampling_params, "min_tokens", 0) or 0
        self.ignore_eos: bool = sampling_params.ignore_eos
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids or ())
        self.eos_token_id = eos_token_id
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority
        self.extra_keys = tuple(extra_keys)
        self.output_token_ids: list[int] = []
        self._all_token_ids = list(self.prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        #: several decode steps may run per schedule (engine.scheduler, multi-step decode):
        #: the engine sets it for requests whose tokens need no host work between steps
        self.decode_ahead = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output token ids; the live list, do not mutate it."""
        return self._all_token_ids

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self.status)

    def is_finished(self) -> bool:
        return self.status >= _FIRST_FINISHED

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"num_tokens={self.num_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens})"
        )
