"""What the completion and chat endpoints share: model check, prompt checks, request
submission, collecting results unless the client leaves, streamed choices and
server-sent events.

One engine request per prompt: its n samples (the response's choices) are
forked by the engine, so its outputs hold n completions.

The server tokenizes on the event loop with its own copy of the tokenizer: a
Rust tokenizer used from two threads at once (the engine thread detokenizes)
can fail with "Already borrowed".
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from engine.admission import EngineOverloadedError
from engine.async_engine import AsyncLLMEngine, EngineRequest, EngineShutdownError, \
    RequestStream, num_sequences
from engine.entrypoints.openai.errors import OpenAIError, as_openai_error, bad_request, \
    invalid_value
from engine.entrypoints.openai.protocol import SamplingRequest, UsageInfo
from engine.entrypoints.stream_delta import Delta, DeltaTracker
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str]):
        self.engine = engine
        self.served_model_names = served_model_names
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.max_model_len = engine.config.max_model_len
        self.max_num_seqs = engine.config.max_num_seqs
        self.vocab_size = engine.engine.vocab_size
        self.token_text = functools.lru_cache(maxsize=65536)(self._decode_token)

    def check_capacity(self) -> None:
        """503 at once while the waiting queue is full: shed load before tokenizing."""
        try:
            self.engine.check_capacity()
        except EngineOverloadedError as err:
            raise as_openai_error(err) from None

    def check_model(self, model: Optional[str]) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if model is None:
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", "model",
                              "model_not_found")
        return model

    def check_prompt_length(self, num_tokens: int, param: str) -> None:
        if num_tokens > self.max_model_len:
            raise bad_request(f"This model's maximum context length (max_model_len) is "
                              f"{self.max_model_len} tokens, but the {param} has "
                              f"{num_tokens} tokens.", param)

    def check_max_tokens(self, num_tokens: int, max_tokens: Optional[int], param: str) -> None:
        """Prompt and max_tokens must fit the context together, as OpenAI and vLLM require."""
        if max_tokens is not None and num_tokens + max_tokens > self.max_model_len:
            raise bad_request(f"This model's maximum context length (max_model_len) is "
                              f"{self.max_model_len} tokens, but {num_tokens + max_tokens} "
                              f"were requested ({num_tokens} in the {param}, {max_tokens} "
                              f"in max_tokens).", "max_tokens")

    def sampling_params(self, request: SamplingRequest) -> SamplingParams:
        try:
            params = request.to_sampling_params()
        except ValueError as err:
            raise invalid_value(err, set(type(request).model_fields)) from None
        if params.n > self.max_num_seqs:  # the n samples run as n sequences at once
            raise bad_request(f"n must be at most max_num_seqs={self.max_num_seqs}, got "
                              f"{params.n}", "n")
        # Out-of-vocabulary ids would fail the sampler mid-step, for the whole batch.
        for token_id in (params.logit_bias or {}):
            if token_id >= self.vocab_size:
                raise bad_request(f"logit_bias token id {token_id} is not below the vocab "
                                  f"size {self.vocab_size}", "logit_bias")
        for token_id in params.stop_token_ids:
            if token_id >= self.vocab_size:
                raise bad_request(f"stop_token_ids: {token_id} is not below the vocab "
                                  f"size {self.vocab_size}", "stop_token_ids")
        return params

    async def add_requests(self, requests: Sequence[EngineRequest],
                           fields: set[str]) -> RequestStream:
        limit, count = self.engine.max_num_waiting, num_sequences(requests)
        if limit is not None and count > limit:
            raise bad_request(f"n: this request makes {count} sequences (prompts x n), "
                              f"more than the server queues at once (max_num_waiting="
                              f"{limit})", "n")
        try:
            return await self.engine.add_requests(requests)
        except ValueError as err:
            raise invalid_value(err, fields) from None
        except (EngineShutdownError, EngineOverloadedError) as err:
            raise as_openai_error(err) from None

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def usage(prompt_lengths: Sequence[int],
          finals: Sequence[Optional[RequestOutput]]) -> UsageInfo:
    """Prompts count once each, whatever n; completion tokens sum over all choices."""
    prompt_tokens = sum(prompt_lengths)
    completion_tokens = sum(len(completion.token_ids) for output in finals
                            if output is not None for completion in output.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


@dataclass
class ChoiceDelta:
    index: int  # the choice's, in the response
    completion: CompletionOutput
    delta: Delta
    finished: bool


class ChoiceTrackers:
    """What each choice of a streamed response gained since the previous output.

    Choice `p * n + i` is sample i of prompt p (the stream's request p). Outputs
    carry every sample, changed or not: a sample reports its finish once.
    """

    def __init__(self, params: SamplingParams, num_prompts: int):
        self.n = params.n
        self._trackers = [DeltaTracker(params.stop, params.include_stop_str_in_output)
                          for _ in range(num_prompts * params.n)]
        self._finished: set[int] = set()

    def updates(self, prompt_index: int, output: RequestOutput) -> Iterator[ChoiceDelta]:
        for completion in output.outputs:
            index = prompt_index * self.n + completion.index
            if index in self._finished:
                continue
            finished = completion.finished()
            if finished:
                self._finished.add(index)
            yield ChoiceDelta(index, completion,
                              self._trackers[index].update(completion, finished), finished)


async def collect_final(raw_request: Request, stream: RequestStream,
                        count: int) -> list[RequestOutput]:
    """The last output of each of the `count` requests of `stream`, by index.

    If the client leaves first, its requests are aborted and nobody gets an answer.
    """
    async def collect() -> list[RequestOutput]:
        finals: list[Optional[RequestOutput]] = [None] * count
        async for index, output in stream:
            finals[index] = output
        return finals

    task = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_client_gone(raw_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        stream.abort()
        if not task.done():
            task.cancel()
    if not task.done():
        raise OpenAIError(499, "the client closed the connection")
    return task.result()


async def _client_gone(raw_request: Request) -> None:
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


def sse_event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events that abort their requests however the response ends.

    A client that leaves cancels the send, leaving the event generator suspended
    (or never started): it is closed and the requests aborted at once, not
    whenever the generator is garbage-collected.
    """

    def __init__(self, events: AsyncGenerator[str, None], stream: RequestStream):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.abort()
            await self.body_iterator.aclose()
