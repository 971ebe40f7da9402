"""LLMEngine: the step loop joining tokenizer, scheduler, model runner and detokenizer.

One `step()` = schedule -> forward + sample -> scheduler bookkeeping (forking the
samples of n > 1 requests, engine.parallel_sampling) -> detokenize (stop strings
finish samples) -> cumulative `RequestOutput`s for the requests that advanced. Bad
requests are rejected in `add_request` with a ValueError naming the field; requests
already in flight are unaffected.

A request asking for prompt logprobs computes its whole prompt (as in vLLM): its blocks
are hashed with a key of its own, so the prefix cache never gives it another request's
blocks (after a preemption it may find its own, whose positions it has already scored).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.distributed.worker import is_torchrun_worker, run_torchrun_worker
from engine.engine_setup import build_engine_parts
from engine.fault_isolation import RequestFailedError, execute_isolating
from engine.logprobs import PositionLogprobs, logprob_dict
from engine.model_runner import RequestSampling, draws_without_history, plain_greedy
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.parallel_sampling import SampleGroup
from engine.request import Request, RequestStatus
from engine.sampling_params import RequestOutputKind, SamplingParams

#: a prompt: text, or {"prompt_token_ids": [...]} (optionally with "prompt" text)
PromptType = Union[str, dict]


@dataclass
class _SampleState:
    """Engine-side state of one sample in flight (the scheduler owns `request`)."""
    request: Request
    group: SampleGroup
    index: int
    detokenizer: IncrementalDetokenizer
    num_detokenized: int = 0
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    stopped_by_string: bool = False
    sampling: Optional[RequestSampling] = None


def _decodes_ahead(params: SamplingParams, sampled: bool) -> bool:
    """Whether several decode steps may run between two of this request's host updates:
    nobody reads its output before it finishes, its draws need nothing the host learns
    per token (no penalties, logprobs, min_tokens or stop strings), and it is greedy
    unless `sampled` (the runner then draws each step on the device with the sampler)."""
    return (params.output_kind == RequestOutputKind.FINAL_ONLY and params.n == 1
            and draws_without_history(params) and (sampled or plain_greedy(params))
            and not params.stop and not params.min_tokens and params.prompt_logprobs is None)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        """Under torchrun with tensor_parallel_size > 1, ranks other than 0 never return:
        they serve rank 0's engine and exit the process when it shuts down."""
        self.config = config
        if is_torchrun_worker(config):
            run_torchrun_worker(config)
            raise SystemExit(0)
        parts = build_engine_parts(config)
        # Stops the tensor-parallel workers on shutdown(), garbage collection or exit.
        self._stop_workers = weakref.finalize(
            self, parts.workers.shutdown if parts.workers else lambda: None)
        self.platform = parts.platform
        self.tokenizer = parts.tokenizer
        self.hf_config = parts.hf_config
        self.model_runner = parts.model_runner
        self.kv_cache_manager = parts.kv_cache_manager
        self.scheduler = parts.scheduler
        self.vocab_size = parts.vocab_size
        self.eos_token_id = parts.eos_token_id
        self._groups: dict[str, SampleGroup] = {}
        self._states: dict[str, _SampleState] = {}
        self._failures: dict[str, Exception] = {}  # of this step, by request id
        #: token id -> its text alone (the decoded_token of logprobs), cached
        self.decode_token = functools.lru_cache(maxsize=None)(
            lambda token_id: self.tokenizer.decode([token_id]))

    # ---- requests -------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType,
                    params: Optional[SamplingParams] = None) -> None:
        """Queue a request; ValueError naming the field if it can never be served."""
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got "
                             f"{type(params).__name__}")
        prompt_text, prompt_token_ids = self.tokenize_prompt(prompt)
        group = SampleGroup(request_id, prompt_text, prompt_token_ids, params,
                            self._generator)
        busy = [sid for sid in group.sample_ids
                if sid in self._states or sid in self.scheduler.requests]
        if busy:
            raise ValueError(f"request_id {request_id!r}: its sample id {busy[0]!r} is "
                             "already in flight")
        extra_keys = () if params.prompt_logprobs is None else (("prompt_logprobs", request_id),)
        request = Request(request_id, prompt_token_ids, params,
                          eos_token_id=self.eos_token_id, extra_keys=extra_keys)
        # Tensor-parallel workers chain argmax picks only (they cannot replay rank 0's draws).
        request.decode_ahead = _decodes_ahead(params, self.config.tensor_parallel_size == 1)
        self.scheduler.add_request(request)
        self._groups[request_id] = group
        self._add_sample(request, group, 0)

    def _add_sample(self, request: Request, group: SampleGroup, index: int) -> None:
        params = group.params
        self._states[request.request_id] = _SampleState(
            request=request, group=group, index=index,
            detokenizer=IncrementalDetokenizer(self.tokenizer, group.prompt_token_ids, params),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None)

    def abort_request(self, request_ids: Union[str, list[str]]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for group in [self._groups.pop(rid) for rid in ids if rid in self._groups]:
            live = [sid for sid in group.sample_ids if sid in self._states]
            self.scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)
            for sid in live:
                del self._states[sid]

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """(prompt text or None, prompt token ids); ValueError for an empty, malformed or
        too long prompt."""
        prompt_text, prompt_token_ids = self._tokenize(prompt)
        self._check_prompt_length(prompt_token_ids)
        return prompt_text, prompt_token_ids

    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, dict) or not ({"prompt", "prompt_token_ids"} & prompt.keys()):
            raise ValueError("prompt must be a string or a dict with 'prompt_token_ids', "
                             f"got {type(prompt).__name__}")
        if "prompt_token_ids" not in prompt:
            return self._tokenize(prompt["prompt"])
        token_ids = prompt["prompt_token_ids"]
        if not isinstance(token_ids, (list, tuple)) or not token_ids:
            raise ValueError("prompt_token_ids must be a non-empty list of ints")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt_token_ids must be ints in [0, {self.vocab_size})")
        return prompt.get("prompt"), list(token_ids)

    def _check_prompt_length(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty (it tokenized to no tokens)")
        max_model_len = self.config.max_model_len
        if len(prompt_token_ids) > max_model_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens long, more than "
                             f"max_model_len={max_model_len}")

    def _generator(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.model_runner.device)
        generator.manual_seed(seed)
        return generator

    # ---- the step loop --------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; outputs of every request that advanced or finished.

        Requests whose processing raised are dropped, and the step ends with a
        RequestFailedError holding them and the others' outputs (engine.fault_isolation).
        """
        scheduler_output = self.scheduler.schedule()
        sampling = {r.request_id: self._step_sampling(self._states[r.request_id])
                    for r in scheduler_output.scheduled_requests}
        runner_output, failures = execute_isolating(
            lambda output: self.model_runner.execute_model(
                output, self.kv_cache_manager.get_block_ids, sampling), scheduler_output)
        for rid, error in failures.items():
            self._fail(rid, error)
        for rid, (first_position, positions) in runner_output.prompt_logprobs.items():
            self._states[rid].group.add_prompt_logprobs(
                first_position, [logprob_dict(p, self.decode_token) for p in positions])
        # A request that drew its samples' first tokens forks them before taking its own.
        forking = runner_output.sibling_token_ids
        advanced = self.scheduler.update_from_output(scheduler_output, {
            rid: ids for rid, ids in runner_output.sampled_token_ids.items() if rid not in forking})
        new_logprobs = dict(runner_output.logprobs)
        for rid, sibling_token_ids in forking.items():
            samples = self._fork(rid, runner_output.sampled_token_ids[rid] + sibling_token_ids)
            advanced += samples
            for sample, positions in zip(samples[1:], runner_output.sibling_logprobs.get(rid, ())):
                new_logprobs[sample.request_id] = [positions]
        touched = {r.request_id: r for r in advanced}
        # Requests finished outside update_from_output (e.g. ignored) show up here.
        for rid in scheduler_output.finished_request_ids:
            if rid in self._states:
                touched.setdefault(rid, self._states[rid].request)
        groups = {}
        for rid in touched:
            if rid in self._states:
                try:
                    group = self._process(self._states[rid], new_logprobs.get(rid, ()))
                except Exception as error:
                    self._fail(rid, error)
                    continue
                if group is not None:
                    groups[group.request_id] = group
        outputs = [self._group_output(group) for group in groups.values()
                   if group.request_id in self._groups and (
                       group.finished or group.params.output_kind != RequestOutputKind.FINAL_ONLY)]
        if self._failures:
            failures, self._failures = self._failures, {}
            raise RequestFailedError(failures, outputs)
        return outputs

    def _fail(self, sample_id: str, error: Exception) -> None:
        """Drop the request a failing sample belongs to, all its samples with it."""
        state = self._states.get(sample_id)
        if state is None:  # a sibling sample failed first
            return
        self._failures[state.group.request_id] = error
        self.abort_request(state.group.request_id)

    def _step_sampling(self, state: _SampleState) -> RequestSampling:
        if state.sampling is not None:
            return state.sampling
        group = state.group
        sampling = RequestSampling(group.params, group.step_generators(state.index),
                                   prompt_logprobs=state.index == 0 and group.needs_prompt_logprobs)
        # It changes only while the prompt is scored or the first tokens of n > 1 samples
        # are drawn; after that it is the same every step.
        if not sampling.prompt_logprobs and (group.forked or group.params.n == 1):
            state.sampling = sampling
        return sampling

    def _fork(self, request_id: str, first_token_ids: list[int]) -> list[Request]:
        state = self._states[request_id]
        samples = state.group.fork(self.scheduler, state.request, first_token_ids)
        for index, sample in enumerate(samples[1:], start=1):
            self._add_sample(sample, state.group, index)
        return samples

    def _process(self, state: _SampleState,
                 new_logprobs: list[PositionLogprobs]) -> Optional[SampleGroup]:
        """Detokenize a sample's new tokens (a stop string finishes it), record its logprobs
        and hand its completion to its group; None when nobody reads it this step (FINAL_ONLY
        and unfinished: its tokens are detokenized on finishing, unless stop strings need
        them every step)."""
        request = state.request
        params = state.group.params
        final_only = params.output_kind == RequestOutputKind.FINAL_ONLY
        if not final_only or params.stop or request.is_finished():
            self._detokenize(state)
        if state.logprobs is not None:
            for position in new_logprobs:
                state.logprobs.append(logprob_dict(position, self.decode_token))
                state.cumulative_logprob += position.logprob
        if final_only and not request.is_finished():
            return None
        completion = self._completion(state)
        state.group.update(completion)
        if completion.finished():
            del self._states[request.request_id]
        return state.group

    def _detokenize(self, state: _SampleState) -> None:
        """Take the tokens appended since the last call; a stop string finishes the request."""
        request = state.request
        new_token_ids = request.output_token_ids[state.num_detokenized:]
        state.num_detokenized = request.num_output_tokens
        if new_token_ids and not state.stopped_by_string:
            state.detokenizer.add_tokens(new_token_ids)
            if state.detokenizer.finished:
                state.stopped_by_string = True
                if not request.is_finished():
                    self.scheduler.finish_requests([request.request_id],
                                                   RequestStatus.FINISHED_STOPPED)

    def _completion(self, state: _SampleState) -> CompletionOutput:
        request = state.request
        finished = request.is_finished()
        finish_reason, stop_reason = request.finish_reason, request.stop_reason
        if state.stopped_by_string:
            finish_reason, stop_reason = "stop", state.detokenizer.stop_reason
        return CompletionOutput(
            index=state.index, text=state.detokenizer.output_text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=state.cumulative_logprob,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            finish_reason=finish_reason if finished else None,
            stop_reason=stop_reason if finished else None)

    def _group_output(self, group: SampleGroup) -> RequestOutput:
        output = group.make_output()
        if output.finished:
            del self._groups[group.request_id]
        return output

    # ---- introspection --------------------------------------------------------

    def get_tokenizer(self):
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op without them, or when already done)."""
        self._stop_workers()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions
