"""Streamable increments of one sample's cumulative outputs.

The engine's outputs are cumulative, and while a stop string may still be
completing, the text may later be cut back to before it. `DeltaTracker` hands
out only text that can no longer be withdrawn: a suffix that could be the start
of a stop string is held back until the next output rules it in or out, and
released when the sample finishes. So the concatenated deltas always equal the
final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from engine.outputs import CompletionOutput, SampleLogprobs


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: Optional[SampleLogprobs]  # one entry per new token, when asked for


class DeltaTracker:
    """What one sample has gained since its previous output."""

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self._stop = [] if include_stop_str_in_output else list(stop)
        self._num_chars = 0
        self._num_tokens = 0

    def update(self, completion: CompletionOutput, finished: bool) -> Delta:
        text = completion.text
        end = len(text) if finished else len(text) - _partial_stop_length(text, self._stop)
        text_delta = text[self._num_chars:end]
        self._num_chars = max(self._num_chars, end)
        new_tokens = slice(self._num_tokens, len(completion.token_ids))
        self._num_tokens = len(completion.token_ids)
        logprobs = None if completion.logprobs is None else completion.logprobs[new_tokens]
        return Delta(text_delta, completion.token_ids[new_tokens], logprobs)


def _partial_stop_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop_string in stop:
        for length in range(min(len(stop_string) - 1, len(text)), longest, -1):
            if text.endswith(stop_string[:length]):
                longest = length
                break
    return longest
