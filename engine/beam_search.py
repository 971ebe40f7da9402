"""Beam search over the paged engine: beams are scheduler requests that fork and free blocks.

Semantics: Hugging Face's `generate(num_beams=k, do_sample=False, early_stopping=True,
length_penalty=lp)`. Each step every running beam of a prompt scores its next token with the
model's raw logprobs (temperature does not change them: HF ignores it without sampling, and
vLLM ranks beams by raw logprobs too); the 2k continuations of highest cumulative logprob
are ranked. Among them, an eos continuation (unless ignore_eos) ranked within the first k
becomes a finished hypothesis scored `cum_logprob / num_generated_tokens ** lp` (the eos
counts), the first k non-eos continuations are the next beams, and the prompt keeps its k
best hypotheses. It is done as soon as it has k hypotheses (early_stopping=True) or after
max_tokens tokens, when the k best continuations of the last step join the hypotheses. The
result lists the hypotheses by descending score. vLLM's own loop differs (it normalizes by
the length including the prompt and keeps every eos continuation).

Engine mechanics: a beam is a Request scheduled like any other (greedy, logprobs=2k). After
the step in which a prompt's beams computed their last token, each surviving continuation is
a new Request forked from its parent beam (`Scheduler.fork_request`: the prefix blocks are
shared by reference count and a shared partial block is copied on write), and the old beams
are finished, which frees every block no survivor holds. The scheduler never sees the sampled
tokens (its update only advances the computed tokens), so the search alone decides how beams
grow and end. If only some of a prompt's beams ran in a step (preemption, token budget), the
ones that ran are replaced by clones forked before the scheduler's update, which recompute
their last token with the others in a later step.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from engine.kv_cache_manager import cdiv
from engine.logprobs import PositionLogprobs, logprob_dict
from engine.model_runner import RequestSampling
from engine.outputs import Logprob
from engine.request import Request, RequestStatus
from engine.sampling_params import BeamSearchParams, SamplingParams

#: gap between the arrival times of consecutive prompts, so the scheduler serves (and under
#: memory pressure keeps) their beams first come, first served
_ARRIVAL_STEP = 1e-6


@dataclass
class BeamSearchSequence:
    """One hypothesis: tokens include the prompt, and so does text (their decoding, as in
    vLLM); logprobs has one dict per generated token (the chosen token and the
    2 * beam_width candidates it was ranked against)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None


@dataclass
class BeamSearchOutput:
    """The hypotheses of one prompt, best score first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


@dataclass(eq=False)
class _Beam:
    """A partial hypothesis; `request` computes its KV while it is running."""

    output_token_ids: list[int]
    cum_logprob: float
    positions: list[PositionLogprobs]
    request: Optional[Request] = None
    parent: Optional["_Beam"] = None


class BeamGroup:
    """One prompt's beams and finished hypotheses: the selection rule, without the engine."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams,
                 eos_token_id: Optional[int]):
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_id = None if params.ignore_eos else eos_token_id
        self.running = [_Beam([], 0.0, [])]
        self.finished: list[tuple[float, _Beam]] = []
        self.done = False

    def score(self, beam: _Beam) -> float:
        return beam.cum_logprob / len(beam.output_token_ids) ** self.params.length_penalty

    def advance(self, reports: list[PositionLogprobs]) -> list[_Beam]:
        """Take each running beam's next-token logprobs (top 2k, in `running` order); returns
        the next running beams (empty once done), each with `parent` set."""
        width = self.params.beam_width
        num_generated = len(self.running[0].output_token_ids) + 1
        candidates = sorted(
            ((beam.cum_logprob + logprob, beam, report, rank)
             for beam, report in zip(self.running, reports)
             for rank, logprob in enumerate(report.top_logprobs)),
            key=lambda candidate: -candidate[0])[:2 * width]
        at_max_tokens = num_generated >= self.params.max_tokens
        running, newly_finished = [], []
        for order, (cum_logprob, beam, report, rank) in enumerate(candidates):
            token_id = report.top_token_ids[rank]
            child = _Beam(beam.output_token_ids + [token_id], cum_logprob, beam.positions + [
                PositionLogprobs(token_id, report.top_logprobs[rank], rank + 1,
                                 report.top_token_ids, report.top_logprobs)], parent=beam)
            if at_max_tokens or token_id == self.eos_token_id:
                if order < width:
                    newly_finished.append(child)
            elif len(running) < width:
                running.append(child)
        self.finished = sorted(self.finished + [(self.score(b), b) for b in newly_finished],
                               key=lambda entry: -entry[0])[:width]
        self.done = at_max_tokens or len(self.finished) == width
        self.running = [] if self.done else running
        return self.running

    def output(self, tokenizer, decode) -> BeamSearchOutput:
        sequences = []
        for _, beam in self.finished:
            tokens = self.prompt_token_ids + beam.output_token_ids
            stopped = beam.output_token_ids[-1] == self.eos_token_id
            sequences.append(BeamSearchSequence(
                tokens=tokens, logprobs=[logprob_dict(p, decode) for p in beam.positions],
                cum_logprob=beam.cum_logprob, text=tokenizer.decode(tokens),
                finish_reason="stop" if stopped else "length"))
        return BeamSearchOutput(sequences)


class BeamSearchRunner:
    """Runs `LLM.beam_search` on an engine with no other requests in flight."""

    def __init__(self, engine):
        self.engine = engine
        self.scheduler = engine.scheduler
        self._request_ids = (f"beam-{i}" for i in itertools.count())
        self._sampling: Optional[RequestSampling] = None  # set per run

    def run(self, prompts: Sequence, params: BeamSearchParams) -> list[BeamSearchOutput]:
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if self.engine.has_unfinished_requests():
            raise ValueError("beam_search needs an engine with no requests in flight")
        groups = [self._new_group(index, prompt, params) for index, prompt in enumerate(prompts)]
        self._sampling = RequestSampling(
            SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True,
                           logprobs=2 * params.beam_width))
        base_time = time.time()
        try:
            for index, group in enumerate(groups):
                root = group.running[0]
                root.request = self._request(group.prompt_token_ids, [],
                                             base_time + index * _ARRIVAL_STEP)
                self.scheduler.add_request(root.request)
            while not all(group.done for group in groups):
                self._step(groups)
        except BaseException:
            self._finish([beam for group in groups for beam in group.running])
            raise
        return [group.output(self.engine.tokenizer, self.engine.decode_token)
                for group in groups]

    def _new_group(self, index: int, prompt, params: BeamSearchParams) -> BeamGroup:
        try:
            _, prompt_token_ids = self.engine.tokenize_prompt(prompt)
        except ValueError as err:
            raise ValueError(f"prompts[{index}]: {err}") from None
        self._check_fits(index, len(prompt_token_ids), params)
        return BeamGroup(prompt_token_ids, params, self.engine.eos_token_id)

    def _check_fits(self, index: int, num_prompt_tokens: int, params: BeamSearchParams) -> None:
        config, kv = self.scheduler.config, self.engine.kv_cache_manager
        max_len = num_prompt_tokens + params.max_tokens
        if max_len > config.max_model_len:
            raise ValueError(f"prompts[{index}]: max_tokens={params.max_tokens} after a prompt "
                             f"of {num_prompt_tokens} tokens exceeds max_model_len="
                             f"{config.max_model_len}")
        # All beams of a prompt must run in the same step, each in its own blocks at worst.
        width = params.beam_width
        if width > min(config.max_num_seqs, config.max_num_batched_tokens) or \
                2 * width > self.engine.vocab_size or \
                width * cdiv(max_len, kv.block_size) > kv.num_blocks:
            raise ValueError(
                f"beam_width={width} needs {width} sequences of up to {max_len} tokens in one "
                f"step and 2 * beam_width candidate tokens: more than max_num_seqs, "
                f"max_num_batched_tokens, the vocab size or the KV pool allow")

    def _request(self, prompt_token_ids: list[int], output_token_ids: list[int],
                 arrival_time: float) -> Request:
        request = Request(next(self._request_ids), prompt_token_ids, self._sampling.params,
                          eos_token_id=self.engine.eos_token_id, arrival_time=arrival_time)
        request.append_output_token_ids(output_token_ids)
        return request

    def _step(self, groups: list[BeamGroup]) -> None:
        scheduler_output = self.scheduler.schedule()
        sampling = {r.request_id: self._sampling for r in scheduler_output.scheduled_requests}
        runner_output = self.engine.model_runner.execute_model(
            scheduler_output, self.engine.kv_cache_manager.get_block_ids, sampling)
        reports = {rid: entries[0] for rid, entries in runner_output.logprobs.items()}
        ready, deferred = [], []
        for group in groups:
            ran = [beam for beam in group.running if beam.request.request_id in reports]
            if len(ran) == len(group.running) and ran:
                ready.append(group)
            else:
                deferred += ran
        replaced = [beam.request for beam in deferred]
        for beam in deferred:
            beam.request = self._fork(beam.request, beam)
        self.scheduler.update_from_output(scheduler_output, {})
        self._finish_requests(replaced)
        for group in ready:
            old_requests = [beam.request for beam in group.running]
            for beam in group.advance([reports[r.request_id] for r in old_requests]):
                beam.request = self._fork(beam.parent.request, beam)
                beam.parent = None  # the path is in the beam itself; let old beams go
            self._finish_requests(old_requests)

    def _fork(self, parent: Request, beam: _Beam) -> Request:
        child = self._request(parent.prompt_token_ids, beam.output_token_ids,
                              parent.arrival_time)
        self.scheduler.fork_request(parent, child)
        return child

    def _finish(self, beams: list[_Beam]) -> None:
        self._finish_requests([beam.request for beam in beams if beam.request is not None])

    def _finish_requests(self, requests: list[Request]) -> None:
        self.scheduler.finish_requests([r.request_id for r in requests],
                                       RequestStatus.FINISHED_ABORTED)
