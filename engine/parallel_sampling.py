"""A caller's request as n samples of one prompt that share its KV blocks (copy-on-write).

Sample 0 is scheduled under the caller's request id and prefills the prompt alone. In the
step where that prefill completes, the runner draws all n first tokens from the prompt's
last logits row, one row per sample generator; sample i's generator is seeded with
seed + i, so with a seed sample i is the n=1 request seeded seed + i. Samples 1..n-1 then
join through `Scheduler.fork_request`: every prompt block is shared by reference count and
the partial last block is copied when a sample first writes into it. All first tokens enter
through `Scheduler.update_from_output` like any sampled token, so every stop rule applies;
sample 0's is held back until the others have forked, so that it cannot finish (and free
the shared blocks) before they exist. n = 1 is the same path with nothing to fork.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

#: torch.Generator.manual_seed takes seeds modulo 2**64
_SEED_MODULUS = 2**64


def sample_request_id(request_id: str, index: int) -> str:
    """The scheduler's id of sample `index` (vLLM's child id format)."""
    return request_id if index == 0 else f"{index}_{request_id}"


class SampleGroup:
    """The caller's request: prompt, the n samples' ids and generators, latest completions,
    and the prompt logprobs (position 0 is None, as in vLLM) when asked for."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, make_generator: Callable[[int], torch.Generator]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.sample_ids = [sample_request_id(request_id, i) for i in range(params.n)]
        self._make_generator = make_generator
        self.generators = [self._generator(i) for i in range(params.n)]
        self.forked = params.n == 1
        self.completions = [CompletionOutput(index=i, text="", token_ids=[])
                            for i in range(params.n)]
        self.num_finished = 0
        self.prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = (
            None if params.prompt_logprobs is None else [None])

    def _generator(self, index: int) -> Optional[torch.Generator]:
        seed = self.params.seed
        return None if seed is None else self._make_generator((seed + index) % _SEED_MODULUS)

    def step_generators(self, index: int) -> list[Optional[torch.Generator]]:
        """One generator per token sample `index` draws if it samples this step: all n for
        sample 0 until the others exist (its first step also draws their first tokens)."""
        return self.generators if index == 0 and not self.forked else [self.generators[index]]

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))

    def add_prompt_logprobs(self, first_position: int,
                            positions: list[dict[int, Logprob]]) -> None:
        """Positions first_position.. of the prompt; ones already known (a recomputed chunk)
        are skipped."""
        known = len(self.prompt_logprobs)
        if first_position <= known:
            self.prompt_logprobs.extend(positions[known - first_position:])

    def fork(self, scheduler: Scheduler, parent: Request,
             first_token_ids: list[int]) -> list[Request]:
        """Add samples 1..n-1 as children of sample 0 (`parent`), then give sample i its first
        token first_token_ids[i]. `parent` must have just computed its whole prompt, with its
        sampled token withheld from `Scheduler.update_from_output`. Returns the n sample
        requests in index order; some may be finished by their first token."""
        self.forked = True
        children = [Request(sample_id, parent.prompt_token_ids, parent.sampling_params,
                            eos_token_id=parent.eos_token_id, arrival_time=parent.arrival_time,
                            priority=parent.priority, extra_keys=parent.extra_keys)
                    for sample_id in self.sample_ids[1:]]
        for child in children:
            scheduler.fork_request(parent, child)
        samples = [parent] + children
        first_step = SchedulerOutput(scheduled_requests=samples,
                                     num_scheduled_tokens={r.request_id: 0 for r in samples})
        scheduler.update_from_output(first_step, {
            request.request_id: [token_id] for request, token_id in zip(samples, first_token_ids)})
        return samples

    def update(self, completion: CompletionOutput) -> None:
        """Take a sample's latest completion (a finished one exactly once)."""
        self.completions[completion.index] = completion
        if completion.finished():
            self.num_finished += 1

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n

    def make_output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             list(self.completions), self.finished,
                             None if self.prompt_logprobs is None else list(self.prompt_logprobs))
