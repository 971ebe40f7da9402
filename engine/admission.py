"""Admission control: a bound on the requests waiting to be scheduled.

Under overload a server must refuse work it cannot start soon rather than
queue it without bound: memory and latency would grow with the burst. The
AsyncLLMEngine consults a `WaitingQueueBound` before queueing requests; the
server turns the refusal into 503 + Retry-After.
"""

from __future__ import annotations

from typing import Optional


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (max_num_waiting): the request was refused; retry later."""


class WaitingQueueBound:
    """At most `max_num_waiting` requests waiting (None: no bound).

    Waiting = the scheduler's waiting queue as the engine thread last saw it
    (preempted requests included) + requests submitted since. The caller holds
    the engine's command lock.
    """

    def __init__(self, max_num_waiting: Optional[int]):
        if max_num_waiting is not None and (isinstance(max_num_waiting, bool) or not
                                            isinstance(max_num_waiting, int)
                                            or max_num_waiting < 1):
            raise ValueError(f"max_num_waiting must be a positive int, got {max_num_waiting!r}")
        self.max_num_waiting = max_num_waiting
        self.num_submitted = 0
        self.num_scheduler_waiting = 0

    @property
    def num_waiting(self) -> int:
        return self.num_submitted + self.num_scheduler_waiting

    def check(self, count: int) -> None:
        """EngineOverloadedError unless `count` more requests fit now; ValueError if never."""
        limit = self.max_num_waiting
        if limit is not None and count > limit:
            raise ValueError(f"{count} requests added together exceed "
                             f"max_num_waiting={limit}: they could never be queued")
        if limit is not None and self.num_waiting + count > limit:
            raise EngineOverloadedError(
                f"the server is overloaded: {self.num_waiting} requests are waiting "
                f"(max_num_waiting={limit}); retry later")

    def admit(self, count: int) -> None:
        self.check(count)
        self.num_submitted += count

    def settle(self, count: int, num_scheduler_waiting: int) -> None:
        """`count` submitted requests reached the scheduler (or were refused by it)."""
        self.num_submitted -= count
        self.num_scheduler_waiting = num_scheduler_waiting

    def observe(self, num_scheduler_waiting: int) -> None:
        """The scheduler's waiting queue after a step (it drains; preemption refills it)."""
        self.num_scheduler_waiting = num_scheduler_waiting
