"""The model runner's fast path on NVIDIA GPUs.

Same steps and results as `ModelRunner` (greedy tokens equal on a float32
model), less time per step:

- inputs reach the GPU in one asynchronous copy from pinned memory
  (engine.input_buffers) instead of one blocking copy per tensor;
- LLaMA-family layers run the fused Triton kernels (engine.models.fused);
- decode steps replay a CUDA graph (engine.cuda_graphs), padded up to the
  nearest captured batch size, up to `max_decode_steps` of them per schedule
  (multi-step decode, engine.scheduler);

The step waits on the GPU once, to read the sampled token ids. `LLM(...,
enforce_eager=True)` keeps the plain runner on a GPU too.

Tensor parallelism: every rank runs this runner. The row-parallel
all-reduces are captured in the graphs with the rest of the forward pass.
Whether a step replays a graph, and which, follows from the plan alone (its
tokens and sequences) and from the captured sizes, which `capture_sizes`
derives from the config every rank shares: all ranks replay the same graph,
so their collectives match.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch

from engine.cuda_graphs import DecodeGraphs, capture_sizes
from engine.input_buffers import InputBuffers
from engine.model_runner import ModelRunner
from engine.models.fused_forward import fused_llama_forward
from engine.step_inputs import StepArrays, StepInputs, StepPlan, decode_steps_max_seq_len

logger = logging.getLogger(__name__)

_HOST = torch.device("cpu")


def make_model_runner(config, platform, attn_backend, model: torch.nn.Module) -> ModelRunner:
    """`GpuModelRunner` on the cuda platform (unless enforce_eager), on every
    tensor-parallel rank alike, else the plain `ModelRunner`."""
    fast = platform.name == "cuda" and not config.enforce_eager
    runner_class = GpuModelRunner if fast else ModelRunner
    return runner_class(config, platform, attn_backend, model)


class GpuModelRunner(ModelRunner):
    #: decode steps per schedule when the batch allows it (engine.scheduler): the host's
    #: per-step work (scheduling, inputs, outputs) is paid once for all of them
    max_decode_steps = 8

    def __init__(self, config, platform, attn_backend, model: torch.nn.Module):
        # Imported here: triton is needed only where this runner runs (CPU installs may lack it).
        from engine.models import fused

        super().__init__(config, platform, attn_backend, model)
        max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self.buffers = InputBuffers(config.max_num_batched_tokens, config.max_num_seqs,
                                    max_blocks_per_seq, config.max_model_len, self.device)
        self.forward_fn = fused_llama_forward(model, config.max_model_len, fused) or model
        self.graphs = None

    def initialize_kv_cache(self) -> int:
        num_blocks = super().initialize_kv_cache()
        if self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.forward, self.buffers,
                                       capture_sizes(self.config.max_num_seqs))
            self.graphs.capture()
        return num_blocks

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """`hidden [T, hidden_size]` of the step, writing its K/V into the cache."""
        return self.forward_fn(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches)

    def _stage_decode_steps(self, arrays: StepArrays
                            ) -> tuple[StepInputs, Callable[[StepInputs], torch.Tensor]]:
        host_inputs = arrays.pack(self.config.block_size, _HOST)
        host_inputs.attn = replace(host_inputs.attn,
                                   max_seq_len=decode_steps_max_seq_len(arrays))
        graph_size = self._graph_size(host_inputs)
        inputs = self.buffers.stage(host_inputs, pad_to=graph_size)
        if graph_size is None:
            return inputs, self.forward
        return inputs, lambda step: self.graphs.replay(graph_size)

    def _graph_size(self, inputs: StepInputs) -> int | None:
        """The captured batch size this step replays, or None to run eagerly."""
        num_tokens = inputs.input_ids.shape[0]
        if self.graphs is None or num_tokens != inputs.attn.num_seqs:
            return None
        return self.graphs.padded_size(num_tokens)

    @torch.inference_mode()
    def execute_plan(self, plan: StepPlan) -> list[torch.Tensor]:
        self.copy_blocks(plan.block_copies)
        if plan.arrays is None:
            return []
        host_inputs = plan.arrays.pack(self.config.block_size, _HOST)
        graph_size = self._graph_size(host_inputs)
        inputs = self.buffers.stage(host_inputs, pad_to=graph_size)
        hidden = self.forward(inputs) if graph_size is None else self.graphs.replay(graph_size)
        sampling_rows = host_inputs.logits_indices.numpy()
        logits = []
        for rows in plan.logits_rows:
            if rows.shape == sampling_rows.shape and (rows == sampling_rows).all():
                index = inputs.logits_indices
            else:
                index = torch.from_numpy(rows).to(self.device)
            logits.append(self.model.compute_logits(hidden[index]))
        return logits
