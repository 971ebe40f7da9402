"""Logprobs of sampled and prompt tokens: from logits to vLLM's output shape.

Runner side (tensors -> Python lists, once per step): every scored position becomes a
`PositionLogprobs`. Logprobs are the log_softmax of the raw logits (see engine.sampler).
Ranks follow vLLM: a token's rank is the number of vocabulary entries whose logit is >= its
own, so the most likely token has rank 1 and tied tokens share the worse rank.

Prompt logprobs: hidden-state row j of a prompt chunk that starts at prompt position c
predicts prompt token c + j + 1, so a chunk of n tokens scores prompt positions
c + 1 .. min(c + n, P - 1) (P = prompt length); the prompt's last row predicts the first
output token and belongs to sampling. Chunks arrive in order, possibly more than once (a
preempted request recomputes its prompt): each result carries the position it starts at.

Engine side: `logprob_dict` builds vLLM's `{token_id: Logprob(logprob, rank,
decoded_token)}` for one position, the scored token first, then the top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from engine.outputs import Logprob
from engine.sampler import compute_logprobs


class PositionLogprobs(NamedTuple):
    """One scored position: the token there, its logprob and rank, and the top-k tokens
    (ids and logprobs in descending order; empty lists when k is 0)."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


def token_ranks(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """vLLM's rank of token_ids [M] under logits [M, V]: [M] int64, 1 = most likely."""
    chosen = logits.gather(1, token_ids.unsqueeze(1))
    return (logits >= chosen).sum(dim=1)


def sampled_position_logprobs(logits: torch.Tensor, sampler_output,
                              num_logprobs: list[Optional[int]]
                              ) -> list[Optional[PositionLogprobs]]:
    """The sampler's logprobs of each row ([N, V] raw logits), None for rows that do not ask;
    row i keeps its first num_logprobs[i] of the batch's top-k."""
    if all(k is None for k in num_logprobs):
        return [None] * len(num_logprobs)
    sampled = sampler_output.sampled_token_ids
    return _positions(sampled, sampler_output.sampled_logprobs, sampler_output.logprob_token_ids,
                      sampler_output.logprobs, token_ranks(logits, sampled), num_logprobs)


def _positions(token_ids: torch.Tensor, logprobs: torch.Tensor, top_token_ids: torch.Tensor,
               top_logprobs: torch.Tensor, ranks: torch.Tensor,
               num_logprobs: list[Optional[int]]) -> list[Optional[PositionLogprobs]]:
    """Rows of [M] / [M, k] tensors as PositionLogprobs, keeping num_logprobs[i] of the top-k
    on row i (None: the row is not asked for)."""
    rows = zip(token_ids.tolist(), logprobs.tolist(), ranks.tolist(), top_token_ids.tolist(),
               top_logprobs.tolist(), num_logprobs)
    return [None if k is None else PositionLogprobs(token_id, logprob, rank, ids[:k], lps[:k])
            for token_id, logprob, rank, ids, lps, k in rows]


@dataclass
class PromptChunk:
    """The prompt tokens one request's chunk scores this step: prompt positions
    first_position .. first_position + len(hidden_rows) - 1, from those rows of the step's
    hidden states."""

    request_id: str
    first_position: int
    hidden_rows: range
    target_token_ids: list[int]
    num_logprobs: int


def prompt_chunks(scheduler_output, num_prompt_logprobs: Callable[[str], Optional[int]]
                  ) -> list[PromptChunk]:
    """The chunks of this step that score prompt tokens, for the requests whose
    num_prompt_logprobs(request_id) is not None (see the module docstring)."""
    chunks, row = [], 0
    for request in scheduler_output.scheduled_requests:
        num_new = scheduler_output.num_scheduled_tokens[request.request_id]
        k = num_prompt_logprobs(request.request_id)
        start = request.num_computed_tokens
        num_scored = min(num_new, request.num_prompt_tokens - 1 - start)
        if k is not None and num_scored > 0:
            chunks.append(PromptChunk(
                request.request_id, start + 1, range(row, row + num_scored),
                request.prompt_token_ids[start + 1:start + 1 + num_scored], k))
        row += num_new
    return chunks


def prompt_chunk_logprobs(logits: torch.Tensor, chunks: list[PromptChunk]
                          ) -> dict[str, tuple[int, list[PositionLogprobs]]]:
    """logits: [sum of the chunks' rows, V] raw logits, the chunks' rows in order.
    Returns request_id -> (first_position, one PositionLogprobs per scored position)."""
    targets = torch.tensor([t for chunk in chunks for t in chunk.target_token_ids],
                           dtype=torch.int64, device=logits.device)
    scored = compute_logprobs(logits, targets, max(chunk.num_logprobs for chunk in chunks))
    positions = _positions(targets, scored.selected_logprobs, scored.token_ids, scored.logprobs,
                           token_ranks(logits, targets),
                           [chunk.num_logprobs for chunk in chunks for _ in chunk.hidden_rows])
    result, row = {}, 0
    for chunk in chunks:
        num_rows = len(chunk.hidden_rows)
        result[chunk.request_id] = (chunk.first_position, positions[row:row + num_rows])
        row += num_rows
    return result


def logprob_dict(position: PositionLogprobs, decode: Callable[[int], str]) -> dict[int, Logprob]:
    """vLLM's dict for one position: the scored token, then the top-k with ranks 1..k."""
    entry = {position.token_id: Logprob(position.logprob, position.rank, decode(position.token_id))}
    for rank, (token_id, logprob) in enumerate(
            zip(position.top_token_ids, position.top_logprobs), start=1):
        entry[token_id] = Logprob(logprob, rank, decode(token_id))
    return entry
