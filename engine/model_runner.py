"""ModelRunner: one scheduler step -> one forward pass -> sampled tokens.

Owns the model and the paged KV cache. Each step it flattens the scheduled
chunks into packed tensors (`engine.step_inputs`), performs the scheduler's
copy-on-write block copies, runs the model, computes logits only for rows
that sample, and samples them.

KV cache layout: `kv_caches[layer] = (key_cache, value_cache)`, each shaped
by `attn_backend.kv_cache_shape(num_blocks, block_size, num_kv_heads,
head_size)`; dim 0 is always the block id (block copies index it).

Tensor parallelism: every rank has a runner over its model shard and the KV
cache of its heads. Rank 0 turns each scheduler step into a `StepPlan`,
sends it to the other ranks, and all run it with `execute_plan`; rank 0
alone samples. The ranks agree on the number of KV blocks (the smallest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch

from engine.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from engine.distributed.communication import all_reduce_min
from engine.distributed.parallel_state import get_tp_group
from engine.distributed.step_channel import send_step
from engine.logprobs import (PositionLogprobs, prompt_chunk_logprobs, prompt_chunks,
                             sampled_position_logprobs)
from engine.models.fused_forward import fused_llama_forward
from engine.sampler import Sampler, SamplingMetadata
from engine.sampling_params import SamplingParams, SamplingType
from engine.step_inputs import (StepArrays, StepInputs, StepPlan, advance_decode_inputs,
                                decode_steps_max_seq_len, dummy_step_inputs, gather_step_arrays)

logger = logging.getLogger(__name__)


@dataclass
class RequestSampling:
    """How a scheduled request samples: its params; one generator (None: torch's default)
    per token to draw from its last logits row, several only to draw the first tokens of its
    parallel samples too; whether to score the prompt tokens its chunk computes."""
    params: SamplingParams
    generators: list[Optional[torch.Generator]] = field(default_factory=lambda: [None])
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        #: one row whose token is the argmax of the raw logits, once min_tokens is reached
        #: (`ModelRunner._sample`'s argmax-only path)
        self.argmax_only = len(self.generators) == 1 and plain_greedy(self.params)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`[N]` int64: each row's first largest logit. `max(...).indices` rather than
    `argmax`, which takes 3x longer on CPUs (torch 2.13, [32, 49152] float32)."""
    return logits.max(dim=-1).indices


def draws_without_history(params: SamplingParams) -> bool:
    """Whether a draw needs none of the tokens sampled before it (no penalties) and
    reports nothing besides the token (no logprobs)."""
    return (params.logprobs is None and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0)


def plain_greedy(params: SamplingParams) -> bool:
    """Whether argmax of the raw logits is this request's whole sampling step
    (min_tokens is checked per request: it masks tokens only early on)."""
    return (params.sampling_type == SamplingType.GREEDY and not params.logit_bias
            and draws_without_history(params))


@dataclass
class ModelRunnerOutput:
    """Per request that sampled: `sampled_token_ids[rid]` = [its token] and, when its params
    ask for logprobs, `logprobs[rid]` = [its PositionLogprobs]. The tokens drawn with its
    further generators are in `sibling_token_ids[rid]` (and `sibling_logprobs[rid]`).
    `prompt_logprobs[rid]` = (first prompt position scored, one PositionLogprobs per scored
    position) for requests whose RequestSampling asks.
    """
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    sibling_token_ids: dict[str, list[int]] = field(default_factory=dict)
    sibling_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[PositionLogprobs]]] = field(default_factory=dict)


class ModelRunner:
    #: decode steps one schedule may cover (multi-step decode, engine.scheduler)
    max_decode_steps = 1

    def __init__(self, config: EngineConfig, platform, attn_backend, model: torch.nn.Module):
        self.config = config
        self.platform = platform
        self.attn_backend = attn_backend
        self.model = model
        self.tp_group = get_tp_group()
        self.device = platform.torch_device(self.tp_group.local_rank)
        self.dtype = next(model.parameters()).dtype
        # The platform's fused elementwise ops where it has them (the CPU's
        # compiled ones in bfloat16); GpuModelRunner sets its own.
        ops = platform.fused_ops(self.dtype)
        fused = None if ops is None else fused_llama_forward(model, config.max_model_len, ops)
        self.forward_fn = fused or model
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0

    # ---- KV cache -------------------------------------------------------------

    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return tuple(self.attn_backend.kv_cache_shape(
            num_blocks, self.config.block_size, self.model.num_kv_heads,
            self.model.head_size))

    def block_bytes(self) -> int:
        """Bytes one block takes over all layers, K and V together."""
        per_tensor = torch.Size(self._cache_shape(1)).numel()
        return 2 * self.model.num_layers * per_tensor * self.dtype.itemsize

    def _allocate(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = self._cache_shape(num_blocks)
        if shape[0] != num_blocks:
            raise ValueError(f"attention backend {self.attn_backend.name!r} puts the "
                             f"block id off dim 0 of its KV cache shape {shape}")
        # Uninitialized on purpose: the platform contract makes every backend
        # ignore slots past seq_len (the conformance matrix poisons them with
        # NaN), and filling gigabytes would cost seconds at startup.
        return [(torch.empty(shape, dtype=self.dtype, device=self.device),
                 torch.empty(shape, dtype=self.dtype, device=self.device))
                for _ in range(self.model.num_layers)]

    def determine_num_blocks(self) -> int:
        """Size the KV pool.

        num_gpu_blocks_override wins; else kv_cache_memory bytes when given
        (the CPU default is 2 GiB); else, on accelerators, what
        gpu_memory_utilization leaves after a profiling forward. Never more
        than max_num_seqs sequences of max_model_len tokens need.
        """
        cfg = self.config
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override
        blocks_per_seq = -(-cfg.max_model_len // cfg.block_size)
        if cfg.kv_cache_memory is not None or self.device.type == "cpu":
            budget, field_name = cfg.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY, \
                "kv_cache_memory"
        else:
            budget, field_name = self._kv_budget_from_profile(), "gpu_memory_utilization"
        num_blocks = all_reduce_min(
            min(budget // self.block_bytes(), cfg.max_num_seqs * blocks_per_seq))
        if num_blocks < blocks_per_seq:
            raise ValueError(f"{field_name}: the KV cache budget of {budget} bytes holds "
                             f"{num_blocks} blocks, fewer than one max_model_len sequence "
                             f"needs ({blocks_per_seq})")
        return num_blocks

    def _kv_budget_from_profile(self) -> int:
        """Bytes left for KV after weights, others' use and a full step's activation peak."""
        accel = getattr(torch, self.device.type)
        accel.synchronize()
        accel.reset_peak_memory_stats()
        baseline = accel.memory_allocated()
        inputs = dummy_step_inputs(self.config, self.device)
        caches = self._allocate(inputs.num_blocks_needed)
        with torch.inference_mode():
            hidden = self.forward_fn(inputs.input_ids, inputs.positions, inputs.attn, caches)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
            num_rows = logits.shape[0]
            # Random sampling is the sampler's most memory-hungry path.
            self.sampler(logits, SamplingMetadata.build(
                [SamplingParams()] * num_rows, [[0]] * num_rows, [[]] * num_rows,
                [None] * num_rows, self.device, logits.shape[-1]))
        accel.synchronize()
        activation_peak = (accel.max_memory_allocated() - baseline
                           - inputs.num_blocks_needed * self.block_bytes())
        del caches, hidden, logits
        accel.empty_cache()
        total, free = self.platform.memory_info()
        budget = int(total * self.config.gpu_memory_utilization) - (total - free) \
            - activation_peak
        logger.info("memory profile: total %.2f GiB, in use %.2f GiB, activation peak "
                    "%.2f GiB -> KV budget %.2f GiB", total / 2**30, (total - free) / 2**30,
                    activation_peak / 2**30, budget / 2**30)
        return max(budget, 0)

    def initialize_kv_cache(self) -> int:
        """Allocate the KV pool; returns the number of blocks."""
        self.num_blocks = self.determine_num_blocks()
        self.kv_caches = self._allocate(self.num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", self.num_blocks,
                    self.config.block_size, self.num_blocks * self.block_bytes() / 2**30)
        return self.num_blocks

    # ---- one step -------------------------------------------------------------

    def copy_blocks(self, block_copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> block dst in every layer's K and V cache."""
        if not block_copies:
            return
        src, dst = (torch.tensor(ids, dtype=torch.long, device=self.device)
                    for ids in zip(*block_copies))
        for key_cache, value_cache in self.kv_caches:
            key_cache.index_copy_(0, dst, key_cache.index_select(0, src))
            value_cache.index_copy_(0, dst, value_cache.index_select(0, src))

    @torch.inference_mode()
    def execute_model(self, scheduler_output, get_block_ids: Callable[[str], list[int]],
                      sampling: dict[str, RequestSampling]) -> ModelRunnerOutput:
        """Run one step.

        `get_block_ids(request_id)` gives a request's block table; `sampling[request_id]`
        says how each scheduled request samples.
        """
        output = ModelRunnerOutput()
        plan = StepPlan(scheduler_output.block_copies)
        chunks, sampling_requests = [], []
        if scheduler_output.total_num_scheduled_tokens:
            plan.arrays, sampling_requests = gather_step_arrays(scheduler_output, get_block_ids)
            if plan.arrays.decode_steps is not None:
                return self._execute_multi_step(plan, sampling_requests, sampling)
            if any(spec.prompt_logprobs for spec in sampling.values()):
                chunks = prompt_chunks(scheduler_output,
                                       lambda rid: sampling[rid].params.prompt_logprobs
                                       if sampling[rid].prompt_logprobs else None)
        if chunks:
            plan.logits_rows.append(np.array(
                [row for chunk in chunks for row in chunk.hidden_rows], np.int64))
        if sampling_requests:
            plan.logits_rows.append(plan.arrays.sampling_rows())
        if self.tp_group.world_size > 1:
            send_step(plan)
        logits = self.execute_plan(plan)
        if chunks:
            output.prompt_logprobs = prompt_chunk_logprobs(logits.pop(0), chunks)
        if sampling_requests:
            self._sample(output, logits.pop(0), sampling_requests, sampling)
        return output

    @torch.inference_mode()
    def execute_plan(self, plan: StepPlan) -> list[torch.Tensor]:
        """Run `plan` on this rank: `logits [n, vocab]` float32 per entry of plan.logits_rows."""
        self.copy_blocks(plan.block_copies)
        if plan.arrays is None:
            return []
        inputs = plan.arrays.pack(self.config.block_size, self.device)
        hidden = self.forward_fn(inputs.input_ids, inputs.positions, inputs.attn,
                                 self.kv_caches)
        return [self.model.compute_logits(hidden[torch.from_numpy(rows).to(self.device)])
                for rows in plan.logits_rows]

    @torch.inference_mode()
    def execute_decode_steps(self, plan: StepPlan, sample: Callable[[torch.Tensor], torch.Tensor]
                             = argmax) -> list[list[int]]:
        """Run a multi-step decode (engine.scheduler): every step takes each request's token
        that `sample(logits [S, V]) -> [S]` drew in the step before as its input token, on the
        device. Returns each request's sampled tokens, `plan.arrays.decode_steps[i]` of
        them. Under tensor parallelism every rank runs it with argmax (the logits are whole
        on every rank, so each picks the same tokens; the engine samples ahead only then)."""
        self.copy_blocks(plan.block_copies)
        steps = plan.arrays.decode_steps
        inputs, forward = self._stage_decode_steps(plan.arrays)
        active = torch.from_numpy(steps).to(self.device)
        sampled = []
        for step in range(int(steps.max())):
            if step:
                advance_decode_inputs(inputs, sampled[-1], active > step, self.config.block_size)
            hidden = forward(inputs)
            sampled.append(sample(self.model.compute_logits(hidden[inputs.logits_indices])))
        rows = torch.stack(sampled, 1).tolist()
        return [row[:n] for row, n in zip(rows, steps.tolist())]

    def _execute_multi_step(self, plan: StepPlan, requests: list,
                            sampling: dict[str, RequestSampling]) -> ModelRunnerOutput:
        """`execute_model` for a multi-step decode: every request samples every step."""
        if self.tp_group.world_size > 1:
            send_step(plan)
        sample = self._decode_steps_sampler(requests, sampling)
        token_ids = self.execute_decode_steps(plan, sample)
        return ModelRunnerOutput(sampled_token_ids={
            request.request_id: ids for request, ids in zip(requests, token_ids)})

    def _decode_steps_sampler(self, requests: list, sampling: dict[str, RequestSampling]
                              ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The draw of each step of a multi-step decode: argmax when every row is plain
        greedy, else the sampler with metadata built once (the requests that decode ahead
        have no penalties, min_tokens or logprobs: nothing in it changes between steps;
        a seeded row draws from its own generator each step, as single steps would)."""
        specs = [sampling[r.request_id] for r in requests]
        if all(spec.argmax_only for spec in specs):
            return argmax
        metadata = []

        def sample(logits: torch.Tensor) -> torch.Tensor:
            if not metadata:
                metadata.append(SamplingMetadata.build(
                    [spec.params for spec in specs], [r.prompt_token_ids for r in requests],
                    [r.output_token_ids for r in requests],
                    [spec.generators[0] for spec in specs], self.device, logits.shape[-1],
                    eos_token_ids=[r.eos_token_id for r in requests]))
            return self.sampler(logits, metadata[0]).sampled_token_ids

        return sample

    def _stage_decode_steps(self, arrays: StepArrays
                            ) -> tuple[StepInputs, Callable[[StepInputs], torch.Tensor]]:
        """The first step's inputs (tensors of their own, advanced in place) and the
        forward pass to run on them."""
        inputs = arrays.pack(self.config.block_size, self.device)
        inputs.attn = replace(inputs.attn, max_seq_len=decode_steps_max_seq_len(arrays))
        inputs.input_ids = inputs.input_ids.clone()
        return inputs, lambda step: self.forward_fn(step.input_ids, step.positions,
                                                    step.attn, self.kv_caches)

    def _sample(self, output: ModelRunnerOutput, logits: torch.Tensor, requests: list,
                sampling: dict[str, RequestSampling]) -> None:
        """Row i of logits [N, V] is requests[i]'s; it is repeated once per generator.

        When every row is plain greedy (`RequestSampling.argmax_only`, past min_tokens) the
        sampler is one argmax: no softmax or log-softmax over the vocabulary."""
        if all(sampling[r.request_id].argmax_only and len(r.output_token_ids) >= r.min_tokens
               for r in requests):
            sampled = output.sampled_token_ids
            for request, token_id in zip(requests, argmax(logits).tolist()):
                sampled[request.request_id] = [token_id]
            return
        specs = [sampling[r.request_id] for r in requests]
        owners = [i for i, spec in enumerate(specs) for _ in spec.generators]
        if len(owners) > len(requests):
            logits = logits[torch.tensor(owners, device=logits.device)]
        rows = [requests[i] for i in owners]
        params = [specs[i].params for i in owners]
        metadata = SamplingMetadata.build(
            params, [r.prompt_token_ids for r in rows], [r.output_token_ids for r in rows],
            [g for spec in specs for g in spec.generators], self.device, logits.shape[-1],
            eos_token_ids=[r.eos_token_id for r in rows])
        sampler_output = self.sampler(logits, metadata)
        token_ids = sampler_output.sampled_token_ids.tolist()
        positions = sampled_position_logprobs(logits, sampler_output,
                                              [p.logprobs for p in params])
        row = 0
        for request, spec in zip(requests, specs):
            rid, end = request.request_id, row + len(spec.generators)
            output.sampled_token_ids[rid] = token_ids[row:row + 1]
            if positions[row] is not None:
                output.logprobs[rid] = positions[row:row + 1]
            if end > row + 1:
                output.sibling_token_ids[rid] = token_ids[row + 1:end]
                if positions[row] is not None:
                    output.sibling_logprobs[rid] = positions[row + 1:end]
            row = end
