"""POST /v1/completions: text or token-id prompts, one or many, n samples each.

Choice `i` is sample `i % n` of prompt `i // n`. All prompts go to the engine
together, so the scheduler batches them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.async_engine import RequestStream
from engine.entrypoints.openai.errors import bad_request, error_event
from engine.entrypoints.openai.protocol import CompletionChoice, CompletionLogprobs, \
    CompletionRequest, CompletionResponse
from engine.entrypoints.openai.serving_engine import SSE_DONE, ChoiceDelta, ChoiceTrackers, \
    EventStreamResponse, OpenAIServing, collect_final, sse_event, usage
from engine.outputs import RequestOutput, SampleLogprobs
from engine.sampling_params import SamplingParams

_FIELDS = set(CompletionRequest.model_fields)


@dataclass
class _Prompt:
    token_ids: list[int]
    text: Optional[str] = None  # decoded only when echoed


@dataclass
class _Batch:
    """One API request: its prompts, with n choices each."""
    request: CompletionRequest
    model_name: str
    prompts: list[_Prompt]
    params: SamplingParams
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def prompt(self, index: int) -> _Prompt:
        return self.prompts[index // self.params.n]

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


@dataclass
class _ChoiceStream:
    started: bool = False
    text_offset: int = 0  # of the next token, for logprobs


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest,
                                raw_request: Request) -> Response:
        self.check_capacity()
        model_name = self.check_model(request.model)
        prompts = self._prompts(request)
        params = self.sampling_params(request)
        self.check_max_tokens(max(len(prompt.token_ids) for prompt in prompts),
                              params.max_tokens, "prompt")
        batch = _Batch(request, model_name, prompts, params)
        requests = [(f"{batch.id}-{p}", {"prompt": prompt.text,
                                         "prompt_token_ids": prompt.token_ids}, params)
                    for p, prompt in enumerate(prompts)]
        stream = await self.add_requests(requests, _FIELDS)
        if request.stream:
            return EventStreamResponse(self._events(batch, stream), stream)
        finals = await collect_final(raw_request, stream, len(prompts))
        return JSONResponse(self._response(batch, finals).model_dump())

    def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append(_Prompt(self.tokenizer.encode(item), item))
                continue
            if not all(0 <= token_id < self.vocab_size for token_id in item):
                raise bad_request(f"prompt: token ids must be in [0, {self.vocab_size})",
                                  "prompt")
            text = self.tokenizer.decode(item) if request.echo else None
            prompts.append(_Prompt(list(item), text))
        for item in prompts:
            self.check_prompt_length(len(item.token_ids), "prompt")
        return prompts

    def _response(self, batch: _Batch, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        completions = [(final, completion) for final in finals for completion in final.outputs]
        for index, (final, completion) in enumerate(completions):
            choice = CompletionChoice(index=index, text=completion.text,
                                      finish_reason=completion.finish_reason,
                                      stop_reason=completion.stop_reason)
            if batch.request.logprobs is not None:
                choice.logprobs = CompletionLogprobs()
            self._add_prompt_echo(batch, index, choice, final)
            if choice.logprobs is not None:
                self._append_logprobs(choice.logprobs, completion.token_ids,
                                      completion.logprobs, 0)
            choices.append(choice)
        prompt_lengths = [len(prompt.token_ids) for prompt in batch.prompts]
        return CompletionResponse(id=batch.id, created=batch.created, model=batch.model_name,
                                  choices=choices, usage=usage(prompt_lengths, finals))

    def _add_prompt_echo(self, batch: _Batch, index: int, choice: CompletionChoice,
                         output: RequestOutput) -> None:
        """With echo, the choice's text (and logprobs) start with the prompt's."""
        if not batch.request.echo:
            return
        prompt = batch.prompt(index)
        choice.text = prompt.text + choice.text
        if choice.logprobs is not None:
            prompt_logprobs = output.prompt_logprobs or [None] * len(prompt.token_ids)
            self._append_logprobs(choice.logprobs, prompt.token_ids, prompt_logprobs, 0)

    def _append_logprobs(self, target: CompletionLogprobs, token_ids: list[int],
                         logprobs: Optional[SampleLogprobs], text_offset: int) -> int:
        """Append tokens from `text_offset` on (or after target's last); -> next offset.

        Offsets count the characters of the tokens' texts before each token.
        """
        if target.text_offset:
            text_offset = target.text_offset[-1] + len(target.tokens[-1])
        for position, token_id in enumerate(token_ids):
            token = self.token_text(token_id)
            entry = logprobs[position] if logprobs else None
            target.tokens.append(token)
            target.text_offset.append(text_offset)
            text_offset += len(token)
            target.token_logprobs.append(entry[token_id].logprob if entry else None)
            target.top_logprobs.append(
                {self.token_text(tid): lp.logprob for tid, lp in entry.items()}
                if entry else None)
        return text_offset

    async def _events(self, batch: _Batch, stream: RequestStream) -> AsyncIterator[str]:
        trackers = ChoiceTrackers(batch.params, len(batch.prompts))
        choice_streams = [_ChoiceStream() for _ in range(batch.num_choices)]
        finals: list[Optional[RequestOutput]] = [None] * len(batch.prompts)
        try:
            async with stream:
                async for p, output in stream:
                    finals[p] = output
                    for update in trackers.updates(p, output):
                        choice = self._stream_choice(batch, update, output,
                                                     choice_streams[update.index])
                        if choice is not None:
                            yield sse_event(CompletionResponse(
                                id=batch.id, created=batch.created, model=batch.model_name,
                                choices=[choice]))
            if batch.request.include_usage:
                prompt_lengths = [len(prompt.token_ids) for prompt in batch.prompts]
                yield sse_event(CompletionResponse(
                    id=batch.id, created=batch.created, model=batch.model_name, choices=[],
                    usage=usage(prompt_lengths, finals)))
        except Exception as err:  # the request failed in the engine after the stream began
            yield error_event(err)
        yield SSE_DONE

    def _stream_choice(self, batch: _Batch, update: ChoiceDelta, output: RequestOutput,
                       state: "_ChoiceStream") -> Optional[CompletionChoice]:
        delta = update.delta
        choice = CompletionChoice(index=update.index, text=delta.text)
        if batch.request.logprobs is not None:
            choice.logprobs = CompletionLogprobs()
        if not state.started:
            state.started = True
            self._add_prompt_echo(batch, update.index, choice, output)
        if choice.logprobs is not None:
            state.text_offset = self._append_logprobs(
                choice.logprobs, delta.token_ids, delta.logprobs, state.text_offset)
        if update.finished:
            choice.finish_reason = update.completion.finish_reason
            choice.stop_reason = update.completion.stop_reason
        elif not choice.text and not (choice.logprobs and choice.logprobs.tokens):
            return None
        return choice
