"""AsyncLLMEngine: LLMEngine's step loop on a background thread, one async stream per call.

Threads: only the engine thread touches the LLMEngine. Coroutines reach it through
a command queue (add, abort) and get outputs back through
`loop.call_soon_threadsafe`, once per step and event loop, so a model step (which
blocks for milliseconds to seconds) never stalls an event loop. With no request in
flight the thread sleeps on an Event. Requests added by many coroutines wait in the
same scheduler and are batched together by it.

Outputs are cumulative (RequestOutput), so a consumer that falls behind is handed
only the latest output of each request: nothing is lost, there are just fewer,
larger increments.

A request with n > 1 is one engine request: the engine forks its n samples off
the prompt's KV blocks (engine.parallel_sampling), and each output holds all n
completions.

Admission: with `max_num_waiting`, requests that would make the waiting queue
longer are refused at once (EngineOverloadedError) instead of queueing without
bound. A request counts once per sample until the engine thread has queued
it, then as the scheduler counts it (once, until its prefill forks the
samples). After `stop_accepting()` (a graceful shutdown) every new request is
refused while those in flight run on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from engine.admission import WaitingQueueBound
from engine.config import EngineConfig
from engine.fault_isolation import RequestFailedError
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.serving_stats import StatsTracker, StepStats

logger = logging.getLogger(__name__)

StepListener = Callable[[StepStats], None]
#: one engine request: (request_id, prompt, sampling params)
EngineRequest = tuple[str, PromptType, SamplingParams]


def num_sequences(requests: Sequence[EngineRequest]) -> int:
    """The samples the requests make together: what max_num_waiting counts them as."""
    return sum(params.n for _, _, params in requests)


class EngineShutdownError(RuntimeError):
    """The engine is stopped: new requests are refused, requests in flight fail with this."""


@dataclass
class _Sink:
    """Where the engine thread delivers a stream's items: a queue living on `loop`."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Failure:
    request_id: str
    error: BaseException


@dataclass
class _AddCommand:
    requests: list[EngineRequest]
    sink: _Sink
    arrival_time: float
    accepted: asyncio.Future


@dataclass
class _AbortCommand:
    request_ids: list[str]


class RequestStream:
    """Async iterator over the outputs of engine requests added together.

    Yields `(index, RequestOutput)`, index = the request's position in the list
    given to `add_requests`; an output holds the request's n completions, each
    finished once it has a finish_reason. Each request's last output has
    `finished=True` and iteration ends once all have finished. A request that
    fails raises its error here and the others are aborted. Leaving early: call
    `abort()` or use the stream as an async context manager.
    """

    def __init__(self, engine: "AsyncLLMEngine", request_ids: list[str], sink: _Sink):
        self._engine = engine
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._unfinished = set(request_ids)
        self._queue = sink.queue
        self._ready: collections.deque[tuple[int, RequestOutput]] = collections.deque()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while not self._ready:
            if not self._unfinished:
                raise StopAsyncIteration
            await self._collect()
        return self._ready.popleft()

    async def _collect(self) -> None:
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        latest: dict[str, RequestOutput] = {}
        for item in items:
            if isinstance(item, _Failure):
                self._unfinished.discard(item.request_id)
                self.abort()
                raise item.error
            latest[item.request_id] = item
        for request_id, output in latest.items():
            if output.finished:
                self._unfinished.discard(request_id)
            self._ready.append((self._index[request_id], output))

    def abort(self) -> None:
        """Abort the unfinished requests; their KV blocks are freed before the next step."""
        if self._unfinished:
            request_ids, self._unfinished = list(self._unfinished), set()
            with contextlib.suppress(EngineShutdownError):  # stopped: nothing left to free
                self._engine._submit(_AbortCommand(request_ids))

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.abort()


class AsyncLLMEngine:
    """Serve one LLMEngine to any number of coroutines; the step loop starts at once."""

    def __init__(self, engine: LLMEngine, max_num_waiting: Optional[int] = None):
        self._waiting = WaitingQueueBound(max_num_waiting)
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._accepting = True
        # Held to queue a command, and by the exiting engine thread to refuse more:
        # every queued command is answered.
        self._commands_lock = threading.Lock()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._stats = StatsTracker(engine)
        self._listeners: tuple[StepListener, ...] = ()
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig,
                    max_num_waiting: Optional[int] = None) -> "AsyncLLMEngine":
        """ValueError naming max_num_waiting for a bad bound, before the model loads."""
        WaitingQueueBound(max_num_waiting)
        return cls(LLMEngine(config), max_num_waiting)

    @property
    def tokenizer(self):
        return self.engine.get_tokenizer()

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def is_accepting(self) -> bool:
        """Running, and taking new requests (not draining for a shutdown)."""
        return self.is_running and self._accepting

    @property
    def max_num_waiting(self) -> Optional[int]:
        return self._waiting.max_num_waiting

    @property
    def num_waiting(self) -> int:
        """Requests admitted but not yet scheduled, as max_num_waiting counts them."""
        with self._commands_lock:
            return self._waiting.num_waiting

    def check_capacity(self) -> None:
        """EngineOverloadedError while the waiting queue is full: lets a server refuse
        a request before spending any work on it."""
        with self._commands_lock:
            self._waiting.check(1)

    def stop_accepting(self) -> None:
        """Refuse new requests (EngineShutdownError); those in flight run on."""
        with self._commands_lock:
            self._accepting = False

    def add_step_listener(self, listener: StepListener) -> None:
        """Call `listener(StepStats)` on the engine thread after every step (and when idle)."""
        self._listeners = self._listeners + (listener,)

    def remove_step_listener(self, listener: StepListener) -> None:
        self._listeners = tuple(x for x in self._listeners if x != listener)

    async def add_requests(self, requests: Sequence[EngineRequest]) -> RequestStream:
        """Queue requests (all or none: ValueError naming the field) -> their stream.

        EngineOverloadedError when they would overfill the waiting queue,
        EngineShutdownError when the engine takes no more requests.
        """
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, asyncio.Queue())
        accepted = loop.create_future()
        self._submit(_AddCommand(list(requests), sink, time.monotonic(), accepted))
        stream = RequestStream(self, [request[0] for request in requests], sink)
        try:
            await accepted
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one prompt, each with its n completions."""
        stream = await self.add_requests([(request_id, prompt, params)])
        async with stream:
            async for _, output in stream:
                yield output

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop the step loop after the current step; requests in flight fail."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- the engine thread ---------------------------------------------------

    def _submit(self, command) -> None:
        with self._commands_lock:
            if self._stopping:
                raise EngineShutdownError("the engine is not running")
            if isinstance(command, _AddCommand):
                if not self._accepting:
                    raise EngineShutdownError("the server is shutting down")
                self._waiting.admit(num_sequences(command.requests))
            self._commands.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._apply_commands()
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._publish()
                    self._wakeup.wait()
        except Exception:
            logger.exception("the engine loop crashed")
        finally:
            self._close()

    def _close(self) -> None:
        """Refuse new commands, answer the queued ones, fail the requests in flight."""
        with self._commands_lock:
            self._stopping = True
        try:
            self._apply_commands()
        except Exception:
            logger.exception("answering the last commands failed")
        self._fail_all(EngineShutdownError("the engine was shut down"))

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _AddCommand):
                self._add(command)
            else:
                self._abort(command.request_ids)

    def _add(self, command: _AddCommand) -> None:
        try:
            if self._stopping:
                raise EngineShutdownError("the engine was shut down")
            added, error = self._add_all(command.requests), None
        except Exception as err:  # the request's own error: it goes back to its caller
            added, error = [], err
        with self._commands_lock:
            self._waiting.settle(num_sequences(command.requests),
                                 self.engine.scheduler.num_waiting)
        for request_id in added:
            self._sinks[request_id] = command.sink
            self._stats.add_request(request_id, command.arrival_time)
        try:
            command.sink.loop.call_soon_threadsafe(_resolve, command.accepted, error)
        except RuntimeError:  # the caller's event loop is closed
            self._abort(added)

    def _add_all(self, requests: list[EngineRequest]) -> list[str]:
        added = []
        try:
            for request_id, prompt, params in requests:
                self.engine.add_request(request_id, prompt, params)
                added.append(request_id)
        except Exception:
            self.engine.abort_request(added)
            raise
        return added

    def _abort(self, request_ids: list[str]) -> None:
        live = [rid for rid in request_ids if self._sinks.pop(rid, None) is not None]
        self.engine.abort_request(live)
        now = time.monotonic()
        for request_id in live:
            self._stats.abort_request(request_id, now)

    def _step(self) -> None:
        start = time.monotonic()
        try:
            outputs = self.engine.step()
        except RequestFailedError as err:  # those requests alone; the others advanced
            outputs = err.outputs
            self._fail(err.failures)
        except Exception as err:
            logger.exception("engine step failed; failing the requests in flight")
            self._fail_all(err)
            return
        self._stats.record_step(start, time.monotonic(), outputs)
        deliveries: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            if output.finished:
                del self._sinks[output.request_id]
            deliveries[sink.loop].append((sink.queue, output))
        self._publish()  # first, so that a client seeing its output also sees it counted
        self._deliver(deliveries)

    def _fail_all(self, error: BaseException) -> None:
        request_ids = list(self._sinks)
        try:
            self.engine.abort_request(request_ids)
        except Exception:
            logger.exception("aborting the requests in flight failed")
        self._fail({request_id: error for request_id in request_ids})

    def _fail(self, errors: dict[str, BaseException]) -> None:
        """Hand each request's error to its stream; the engine has dropped them."""
        deliveries: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        now = time.monotonic()
        for request_id, error in errors.items():
            sink = self._sinks.pop(request_id, None)
            if sink is None:
                continue
            self._stats.abort_request(request_id, now)
            deliveries[sink.loop].append((sink.queue, _Failure(request_id, error)))
        self._deliver(deliveries)

    def _deliver(self, deliveries: dict[asyncio.AbstractEventLoop, list]) -> None:
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody reads these streams
                self._abort([item.request_id for _, item in items])

    def _publish(self) -> None:
        with self._commands_lock:
            self._waiting.observe(self.engine.scheduler.num_waiting)
        stats = self._stats.take()
        for listener in self._listeners:
            try:
                listener(stats)
            except Exception:
                logger.exception("step listener %r failed", listener)


def _resolve(future: asyncio.Future, error: Optional[BaseException]) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for stream_queue, item in items:
        stream_queue.put_nowait(item)
