"""What the engine hands back per request, shaped like vLLM's outputs.

A `RequestOutput` is cumulative: each step's output carries all text and
tokens generated so far, so a caller may keep only the latest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    """One candidate token's log-probability at one output position."""
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


#: per output position: token id -> Logprob (the sampled token plus the top-k)
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
