"""POST /v1/chat/completions: the conversation through the tokenizer's chat template.

The rendered template already holds any BOS and special tokens, so it is
encoded without adding special tokens again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.async_engine import RequestStream
from engine.entrypoints.openai.errors import bad_request, error_event
from engine.entrypoints.openai.protocol import AssistantMessage, ChatChoice, \
    ChatChoiceLogprobs, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, \
    ChatStreamChoice, DeltaMessage, TokenLogprob, TopLogprob
from engine.entrypoints.openai.serving_engine import SSE_DONE, ChoiceDelta, ChoiceTrackers, \
    EventStreamResponse, OpenAIServing, collect_final, sse_event, usage
from engine.outputs import RequestOutput, SampleLogprobs
from engine.sampling_params import SamplingParams

_FIELDS = set(ChatCompletionRequest.model_fields)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
        self.check_capacity()
        model_name = self.check_model(request.model)
        prompt_token_ids = self._render(request)
        self.check_prompt_length(len(prompt_token_ids), "messages")
        params = self.sampling_params(request)
        self.check_max_tokens(len(prompt_token_ids), params.max_tokens, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.add_requests(
            [(request_id, {"prompt_token_ids": prompt_token_ids}, params)], _FIELDS)
        head = {"id": request_id, "created": int(time.time()), "model": model_name}
        if request.stream:
            events = self._events(request, params, head, stream, len(prompt_token_ids))
            return EventStreamResponse(events, stream)
        finals = await collect_final(raw_request, stream, 1)
        choices = [ChatChoice(
            index=completion.index, message=AssistantMessage(content=completion.text),
            logprobs=self._logprobs(completion.token_ids, completion.logprobs, params.logprobs),
            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
            for completion in finals[0].outputs]
        response = ChatCompletionResponse(**head, choices=choices,
                                          usage=usage([len(prompt_token_ids)], finals))
        return JSONResponse(response.model_dump())

    def _render(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template: use "
                              "/v1/completions", "messages")
        messages = [message.as_template_input() for message in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as err:  # the template rejects the conversation (jinja raises)
            raise bad_request(f"messages: the chat template failed: {err}",
                              "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _logprobs(self, token_ids: list[int], logprobs: Optional[SampleLogprobs],
                  num_top: Optional[int]) -> Optional[ChatChoiceLogprobs]:
        if num_top is None or logprobs is None:
            return None
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items()
                            if lp.rank is not None)[:num_top]
            content.append(TokenLogprob(
                **self._top_logprob(token_id, entry[token_id].logprob).model_dump(),
                top_logprobs=[self._top_logprob(tid, lp) for _, tid, lp in ranked]))
        return ChatChoiceLogprobs(content=content)

    def _stream_chunk(self, update: ChoiceDelta,
                      num_top_logprobs: Optional[int]) -> Optional[ChatStreamChoice]:
        """The choice's increment; None when it has gained nothing to send."""
        delta = update.delta
        logprobs = self._logprobs(delta.token_ids, delta.logprobs, num_top_logprobs)
        if not (delta.text or update.finished or (logprobs and logprobs.content)):
            return None
        choice = ChatStreamChoice(index=update.index,
                                  delta=DeltaMessage(content=delta.text or None),
                                  logprobs=logprobs)
        if update.finished:
            choice.finish_reason = update.completion.finish_reason
            choice.stop_reason = update.completion.stop_reason
        return choice

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.token_text(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    async def _events(self, request: ChatCompletionRequest, params: SamplingParams,
                      head: dict, stream: RequestStream,
                      num_prompt_tokens: int) -> AsyncIterator[str]:
        trackers = ChoiceTrackers(params, 1)
        finals: list[Optional[RequestOutput]] = [None]
        try:
            async with stream:
                yield sse_event(ChatCompletionChunk(**head, choices=[
                    ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant",
                                                                     content=""))
                    for index in range(params.n)]))
                async for _, output in stream:
                    finals[0] = output
                    for update in trackers.updates(0, output):
                        chunk = self._stream_chunk(update, params.logprobs)
                        if chunk is not None:
                            yield sse_event(ChatCompletionChunk(**head, choices=[chunk]))
            if request.include_usage:
                yield sse_event(ChatCompletionChunk(**head, choices=[],
                                                    usage=usage([num_prompt_tokens], finals)))
        except Exception as err:  # the request failed in the engine after the stream began
            yield error_event(err)
        yield SSE_DONE
