"""ModelRunner: one scheduler step -> one forward pass -> sampled tokens.

Owns the model and the paged KV cache. Each step it flattens the scheduled
chunks into packed tensors (`engine.step_inputs`), performs the scheduler's
copy-on-write block copies, runs the model, computes logits only for rows
that sample, and samples them.

KV cache layout: `kv_caches[layer] = (key_cache, value_cache)`, each shaped
by `attn_backend.kv_cache_shape(num_blocks, block_size, num_kv_heads,
head_size)`; dim 0 is always the block id (block copies index it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from engine.sampler import Sampler, SamplingMetadata
from engine.sampling_params import SamplingParams
from engine.step_inputs import StepInputs, dummy_step_inputs, prepare_step_inputs

logger = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    """Per sampling request: the new token ids, and their logprobs when asked.

    `logprobs[request_id]` has one entry per new token: (token id, its
    logprob, top-k ids, top-k logprobs) with k = SamplingParams.logprobs;
    present only for requests that set it.
    """
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[tuple[int, float, list[int], list[float]]]] = \
        field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig, platform, attn_backend, model: torch.nn.Module):
        self.config = config
        self.platform = platform
        self.attn_backend = attn_backend
        self.model = model
        self.device = platform.torch_device()
        self.dtype = next(model.parameters()).dtype
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
        num_blocks = min(budget // self.block_bytes(), cfg.max_num_seqs * blocks_per_seq)
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
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, caches)
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
                      sampling: dict[str, Any]) -> ModelRunnerOutput:
        """Run one step.

        `get_block_ids(request_id)` gives a request's block table;
        `sampling[request_id]` = (SamplingParams, torch.Generator | None).
        """
        self.copy_blocks(scheduler_output.block_copies)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput()
        inputs = prepare_step_inputs(scheduler_output, get_block_ids,
                                     self.config.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches)
        if not inputs.sampling_requests:
            return ModelRunnerOutput()
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return self._sample(logits, inputs, sampling)

    def _sample(self, logits: torch.Tensor, inputs: StepInputs,
                sampling: dict[str, Any]) -> ModelRunnerOutput:
        requests = inputs.sampling_requests
        params = [sampling[r.request_id][0] for r in requests]
        metadata = SamplingMetadata.build(
            params, [r.prompt_token_ids for r in requests],
            [r.output_token_ids for r in requests],
            [sampling[r.request_id][1] for r in requests], self.device, logits.shape[-1],
            eos_token_ids=[r.eos_token_id for r in requests])
        sampler_output = self.sampler(logits, metadata)
        token_ids = sampler_output.sampled_token_ids.tolist()
        output = ModelRunnerOutput(
            {r.request_id: [t] for r, t in zip(requests, token_ids)})
        if metadata.max_num_logprobs is not None:
            self._collect_logprobs(output, requests, params, token_ids, sampler_output)
        return output

    @staticmethod
    def _collect_logprobs(output: ModelRunnerOutput, requests, params, token_ids,
                          sampler_output) -> None:
        sampled = sampler_output.sampled_logprobs.tolist()
        top_ids = sampler_output.logprob_token_ids.tolist()
        top_logprobs = sampler_output.logprobs.tolist()
        for i, (request, param) in enumerate(zip(requests, params)):
            if param.logprobs is None:
                continue
            k = param.logprobs
            output.logprobs[request.request_id] = [
                (token_ids[i], sampled[i], top_ids[i][:k], top_logprobs[i][:k])]
