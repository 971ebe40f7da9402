"""`LLM`: the vLLM-compatible offline API (generate, chat) over one LLMEngine."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from engine.beam_search import BeamSearchOutput, BeamSearchRunner
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

#: one chat message: {"role": ..., "content": ...}
Conversation = list[dict]


class LLM:
    """Load a model once and run batches of prompts through continuous batching.

    `model=None` loads the default model (SmolLM2-135M-Instruct). Keyword
    arguments are vLLM's; see EngineConfig.
    """

    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None,
                 device: str = "auto", dtype: str = "auto", seed: int = 0,
                 block_size: int = 16, max_model_len: Optional[int] = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: Optional[int] = None,
                 enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.9,
                 num_gpu_blocks_override: Optional[int] = None,
                 kv_cache_memory: Optional[int] = None,
                 attention_backend: Optional[str] = None, tensor_parallel_size: int = 1,
                 enforce_eager: bool = False):
        config = EngineConfig(
            model=model, tokenizer=tokenizer, device=device, dtype=dtype, seed=seed,
            block_size=block_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            gpu_memory_utilization=gpu_memory_utilization,
            num_gpu_blocks_override=num_gpu_blocks_override,
            kv_cache_memory=kv_cache_memory, attention_backend=attention_backend,
            tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager)
        self.llm_engine = LLMEngine(config)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (also done at garbage collection/exit)."""
        self.llm_engine.shutdown()

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        Every prompt is validated before any runs: one bad prompt is a
        ValueError (prefixed with its index) and nothing of the batch stays
        queued, so the LLM keeps serving later calls.
        """
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = _params_per_prompt(sampling_params, len(prompts))
        request_ids = [str(next(self._request_counter)) for _ in prompts]
        added = []
        try:
            for index, (request_id, prompt, param) in enumerate(
                    zip(request_ids, prompts, params)):
                try:
                    self.llm_engine.add_request(request_id, prompt, param)
                except ValueError as err:
                    raise ValueError(f"prompts[{index}]: {err}") from None
                added.append(request_id)
        except BaseException:
            self.llm_engine.abort_request(added)
            raise
        return self._run_engine(request_ids, use_tqdm)

    def beam_search(self, prompts: Union[PromptType, Sequence[PromptType]],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search for every prompt (engine.beam_search: HF's early_stopping=True
        semantics); outputs in input order, hypotheses best first. Runs alone: ValueError
        while other requests are in flight."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        return BeamSearchRunner(self.llm_engine).run(prompts, params)

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them (tokenizer's chat template)."""
        tokenizer = self.get_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template: the tokenizer has no chat template")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages or conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
            # The template already wrote any BOS/special tokens into the text.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(
                text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True,
                   disable=not use_tqdm)
        start, num_prompt_tokens, num_output_tokens = time.perf_counter(), 0, 0
        with bar:
            while len(finished) < len(request_ids) \
                    and self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if not output.finished:
                        continue
                    finished[output.request_id] = output
                    num_prompt_tokens += len(output.prompt_token_ids)
                    num_output_tokens += sum(len(c.token_ids) for c in output.outputs)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"input: {num_prompt_tokens / elapsed:.1f} tok/s, "
                                        f"output: {num_output_tokens / elapsed:.1f} tok/s",
                                        refresh=False)
                    bar.update(1)
        return [finished[request_id] for request_id in request_ids]


def _params_per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
    """One params per prompt, each a FINAL_ONLY copy: `generate` returns finished outputs only
    (the caller's objects stay unchanged; prompts sharing one object share one copy)."""
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [_final_only(sampling_params)] * num_prompts
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(f"sampling_params: got {len(params)} for {num_prompts} prompts "
                         "(pass one, or one per prompt)")
    copies: dict[int, SamplingParams] = {}
    for p in params:
        if isinstance(p, SamplingParams) and id(p) not in copies:
            copies[id(p)] = _final_only(p)
    return [copies.get(id(p), p) for p in params]


def _final_only(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
