"""Request and response bodies of the OpenAI API, as pydantic models.

Requests take OpenAI's fields plus vLLM's sampling extensions (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids); unknown fields are
ignored, as OpenAI-compatible servers do. A null sampling field means its
default. Range checks are left to SamplingParams, whose ValueErrors name the
field, so one rule holds for the offline and the server API; only what the
OpenAI API itself bounds more tightly (logit_bias values) is checked here.
Strings must be encodable as UTF-8: JSON may carry lone surrogates
("\\ud800"), which the tokenizer cannot take.
"""

from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, \
    model_serializer

from engine.sampling_params import SamplingParams

#: OpenAI's range of a logit_bias value; beyond it, biases only overflow the logits
MAX_LOGIT_BIAS = 100.0


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("*", mode="before")
    @classmethod
    def _strings_are_unicode(cls, value):
        if _has_surrogate(value):
            raise ValueError("strings must be valid Unicode (got a lone UTF-16 surrogate)")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    # The endpoints name and type the output length and logprobs fields differently
    # (max_tokens / max_completion_tokens, logprobs int / bool + top_logprobs): each
    # subclass maps its own onto SamplingParams' through these three.
    @property
    def max_output_tokens(self) -> Optional[int]:
        raise NotImplementedError

    @property
    def num_logprobs(self) -> Optional[int]:
        """Top candidates per sampled token (SamplingParams.logprobs); None: no logprobs."""
        raise NotImplementedError

    @property
    def num_prompt_logprobs(self) -> Optional[int]:
        return None

    def to_sampling_params(self) -> SamplingParams:
        """ValueError naming the field for any out-of-range value."""
        def value(field: str, default):
            given = getattr(self, field)
            return default if given is None else given

        return SamplingParams(
            n=self.n, temperature=value("temperature", 1.0), top_p=value("top_p", 1.0),
            top_k=value("top_k", 0), min_p=value("min_p", 0.0), seed=self.seed,
            presence_penalty=value("presence_penalty", 0.0),
            frequency_penalty=value("frequency_penalty", 0.0),
            repetition_penalty=value("repetition_penalty", 1.0),
            logit_bias=_token_id_keys(self.logit_bias), stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=self.max_output_tokens, min_tokens=self.min_tokens,
            logprobs=self.num_logprobs, prompt_logprobs=self.num_prompt_logprobs)


def _has_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(item) for item in value)
    return False


def _token_id_keys(logit_bias: Optional[dict[str, float]]) -> Optional[dict[int, float]]:
    """OpenAI sends logit_bias keys as strings of token ids."""
    if logit_bias is None:
        return None
    try:
        biases = {int(token_id): bias for token_id, bias in logit_bias.items()}
    except ValueError:
        raise ValueError(f"logit_bias keys must be token ids, got {list(logit_bias)}") from None
    for token_id, bias in biases.items():
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, "
                             f"{MAX_LOGIT_BIAS}], got {bias} for token {token_id}")
    return biases


class CompletionRequest(SamplingRequest):
    prompt: Union[list[int], list[list[int]], str, list[str]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if not value or any(not p for p in value if isinstance(p, (str, list))):
            raise ValueError("prompt must not be empty, nor contain an empty prompt")
        return value

    @property
    def max_output_tokens(self) -> Optional[int]:
        return self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> Optional[int]:
        """Echoed prompts carry logprobs too."""
        return self.logprobs if self.echo else None


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def as_template_input(self) -> dict:
        content = self.content if not isinstance(self.content, list) \
            else "".join(part.text for part in self.content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    @property
    def max_output_tokens(self) -> Optional[int]:
        """max_completion_tokens, OpenAI's newer name, wins over max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses ---------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token its text, offset, logprob and top candidates."""
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class ChoiceBase(BaseModel):
    index: int
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None  # the stop string or token id that matched


class ResponseBase(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(ChoiceBase):
    text: str
    logprobs: Optional[CompletionLogprobs] = None


class CompletionResponse(ResponseBase):
    """A whole response, or with stream=true one chunk of it."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ChoiceBase):
    message: AssistantMessage
    logprobs: Optional[ChatChoiceLogprobs] = None


class ChatCompletionResponse(ResponseBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """A chunk's increment of the assistant message; unset fields are left out."""
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(ChoiceBase):
    delta: DeltaMessage
    logprobs: Optional[ChatChoiceLogprobs] = None


class ChatCompletionChunk(ResponseBase):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: Optional[str] = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
