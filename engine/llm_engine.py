"""LLMEngine: the step loop joining tokenizer, scheduler, model runner and detokenizer.

One `step()` = schedule -> forward + sample -> scheduler bookkeeping ->
detokenize (stop strings finish requests) -> cumulative `RequestOutput`s for
the requests that advanced. Bad requests are rejected in `add_request` with a
ValueError naming the field; requests already in flight are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_setup import build_engine_parts
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams

#: a prompt: text, or {"prompt_token_ids": [...]} (optionally with "prompt" text)
PromptType = Union[str, dict]


@dataclass
class _RequestState:
    """Engine-side state of one in-flight request (the scheduler owns `request`)."""
    request: Request
    prompt: Optional[str]
    params: SamplingParams
    generator: Optional[torch.Generator]
    detokenizer: IncrementalDetokenizer
    num_detokenized: int = 0
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    stopped_by_string: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        parts = build_engine_parts(config)
        self.platform = parts.platform
        self.tokenizer = parts.tokenizer
        self.hf_config = parts.hf_config
        self.model_runner = parts.model_runner
        self.kv_cache_manager = parts.kv_cache_manager
        self.scheduler = parts.scheduler
        self.vocab_size = parts.vocab_size
        self.eos_token_id = parts.eos_token_id
        self._states: dict[str, _RequestState] = {}

    # ---- requests -------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType,
                    params: Optional[SamplingParams] = None) -> None:
        """Queue a request; ValueError naming the field if it can never be served."""
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got "
                             f"{type(params).__name__}")
        if params.n != 1:
            raise ValueError(f"n={params.n}: only n=1 is supported so far")
        prompt_text, prompt_token_ids = self._tokenize(prompt)
        self._check_prompt_length(prompt_token_ids)
        request = Request(request_id, prompt_token_ids, params,
                          eos_token_id=self.eos_token_id)
        self.scheduler.add_request(request)
        self._states[request_id] = _RequestState(
            request=request, prompt=prompt_text, params=params,
            generator=self._generator(params),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None)

    def abort_request(self, request_ids: Union[str, list[str]]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        live = [rid for rid in ids if rid in self._states]
        self.scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)
        for rid in live:
            del self._states[rid]

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def get_num_unfinished_requests(self) -> int:
        return len(self._states)

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

    def _generator(self, params: SamplingParams) -> Optional[torch.Generator]:
        if params.seed is None:
            return None
        generator = torch.Generator(device=self.model_runner.device)
        generator.manual_seed(params.seed)
        return generator

    # ---- the step loop --------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; outputs of every request that advanced or finished."""
        scheduler_output = self.scheduler.schedule()
        sampling = {r.request_id: (self._states[r.request_id].params,
                                   self._states[r.request_id].generator)
                    for r in scheduler_output.scheduled_requests}
        runner_output = self.model_runner.execute_model(
            scheduler_output, self.kv_cache_manager.get_block_ids, sampling)
        advanced = self.scheduler.update_from_output(
            scheduler_output, runner_output.sampled_token_ids)
        touched = {r.request_id: r for r in advanced}
        # Requests finished outside update_from_output (e.g. ignored) show up here.
        for rid in scheduler_output.finished_request_ids:
            if rid in self._states:
                touched.setdefault(rid, self._states[rid].request)
        return [self._process(request, runner_output.logprobs.get(rid))
                for rid, request in touched.items() if rid in self._states]

    def _process(self, request: Request, new_logprobs) -> RequestOutput:
        state = self._states[request.request_id]
        new_token_ids = request.output_token_ids[state.num_detokenized:]
        state.num_detokenized = request.num_output_tokens
        if new_token_ids and not state.stopped_by_string:
            state.detokenizer.add_tokens(new_token_ids)
            if state.detokenizer.finished:
                state.stopped_by_string = True
                if not request.is_finished():
                    self.scheduler.finish_requests([request.request_id],
                                                   RequestStatus.FINISHED_STOPPED)
        if new_logprobs and state.logprobs is not None:
            self._append_logprobs(state, new_logprobs)
        output = self._make_output(state)
        if output.finished:
            del self._states[request.request_id]
        return output

    def _append_logprobs(self, state: _RequestState, new_logprobs) -> None:
        for token_id, token_logprob, top_ids, top_logprobs in new_logprobs:
            entry = {tid: Logprob(lp, rank=rank, decoded_token=self._decode_one(tid))
                     for rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs), start=1)}
            # The sampled token is always listed; its rank is known only inside the top-k.
            entry.setdefault(token_id, Logprob(token_logprob,
                                               decoded_token=self._decode_one(token_id)))
            state.logprobs.append(entry)
            state.cumulative_logprob += token_logprob

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _make_output(self, state: _RequestState) -> RequestOutput:
        request = state.request
        finished = request.is_finished()
        finish_reason, stop_reason = request.finish_reason, request.stop_reason
        if state.stopped_by_string:
            finish_reason, stop_reason = "stop", state.detokenizer.stop_reason
        completion = CompletionOutput(
            index=0, text=state.detokenizer.output_text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=state.cumulative_logprob,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            finish_reason=finish_reason if finished else None,
            stop_reason=stop_reason if finished else None)
        return RequestOutput(request.request_id, state.prompt, request.prompt_token_ids,
                             [completion], finished)

    # ---- introspection --------------------------------------------------------

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

