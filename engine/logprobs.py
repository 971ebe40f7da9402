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

from typing import Callable, NamedTuple

import torch

from engine.outputs import Logprob
from engine.sampler import compute_prompt_logprobs


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


def position_logprobs(token_ids: list[int], logprobs: list[float], ranks: list[int],
                      top_token_ids: list[list[int]] | None, top_logprobs: list[list[float]] | None,
                      num_logprobs: list[int]) -> list[PositionLogprobs]:
    """Zip per-row lists into PositionLogprobs; row i keeps its first num_logprobs[i] of the top-k."""
    return [PositionLogprobs(token_id, logprob, rank,
                             top_token_ids[i][:k] if k else [], top_logprobs[i][:k] if k else [])
            for i, (token_id, logprob, rank, k)
            in enumerate(zip(token_ids, logprobs, ranks, num_logprobs))]


def prompt_chunk_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor],
                          chunk_hidden: torch.Tensor, prompt_token_ids: list[int],
                          chunk_start: int, num_logprobs: int) -> list[PositionLogprobs]:
    """Logprobs of the prompt tokens a chunk scores (see the module docstring).

    chunk_hidden: [n, hidden_size], the chunk's hidden states (prompt positions chunk_start
    .. chunk_start + n - 1). Returns one entry per scored prompt position, in order, starting
    with position chunk_start + 1; empty when the chunk scores none.
    """
    num_rows = min(chunk_hidden.shape[0], len(prompt_token_ids) - 1 - chunk_start)
    if num_rows <= 0:
        return []
    logits = compute_logits(chunk_hidden[:num_rows])
    window = prompt_token_ids[chunk_start:chunk_start + num_rows + 1]
    scored = compute_prompt_logprobs(logits, window, num_logprobs)
    targets = torch.tensor(window[1:], dtype=torch.int64, device=logits.device)
    return position_logprobs(
        window[1:], scored.selected_logprobs.tolist(), token_ranks(logits, targets).tolist(),
        None if scored.token_ids is None else scored.token_ids.tolist(),
        None if scored.logprobs is None else scored.logprobs.tolist(), [num_logprobs] * num_rows)


def logprob_dict(position: PositionLogprobs, decode: Callable[[int], str]) -> dict[int, Logprob]:
    """vLLM's dict for one position: the scored token, then the top-k with ranks 1..k."""
    entry = {position.token_id: Logprob(position.logprob, position.rank, decode(position.token_id))}
    for rank, (token_id, logprob) in enumerate(
            zip(position.top_token_ids, position.top_logprobs), start=1):
        entry[token_id] = Logprob(logprob, rank, decode(token_id))
    return entry
