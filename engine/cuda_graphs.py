"""CUDA graphs of the decode forward pass, one per captured batch size.

A decode step of a few hundred tokens runs ~250 small kernels (16 layers of
projections, norms, rotary, attention); launched one by one from Python the
GPU waits on the host between them. A graph replays them all with one
launch. Each graph reads its inputs from the fixed addresses of
`InputBuffers.graph_inputs(batch_size)`; a step of n decode tokens replays
the graph of the smallest captured size >= n, padded (`InputBuffers.stage`).
The attention backends size their grids from the `max_seq_len` hint, which
the padded inputs fix at max_model_len, so every replay launches the grid it
was captured with; the kernels read the true lengths from `seq_lens`.

Under tensor parallelism the graphs hold the row-parallel all-reduces too
(NCCL collectives are capturable; every rank captures the same sizes in the
same order). The capture is thread-local, so that CUDA calls other threads
make meanwhile (NCCL's watchdog polls the events of the warm-up's
collectives) cannot invalidate it.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, Optional

import torch

from engine.input_buffers import InputBuffers
from engine.step_inputs import StepInputs

logger = logging.getLogger(__name__)

#: below this, every power of two is captured; from it on, every multiple of it
SIZE_STEP = 16


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then multiples of 16, and max_num_seqs itself."""
    sizes = {size for size in (1, 2, 4, 8) if size < max_num_seqs}
    sizes.update(range(SIZE_STEP, max_num_seqs + 1, SIZE_STEP))
    sizes.add(max_num_seqs)
    return sorted(sizes)


class DecodeGraphs:
    """`forward(inputs) -> hidden [B, hidden_size]` captured for each of `sizes`."""

    def __init__(self, forward: Callable[[StepInputs], torch.Tensor], buffers: InputBuffers,
                 sizes: list[int]):
        self.forward = forward
        self.buffers = buffers
        self.sizes = sorted(sizes)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, so the smaller ones reuse its memory pool."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            inputs = self.buffers.graph_inputs(size)
            # The warm-up compiles kernels and settles cuBLAS workspaces outside capture.
            self.forward(inputs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                hidden = self.forward(inputs)
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
                    len(self.sizes), self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def padded_size(self, num_tokens: int) -> Optional[int]:
        """The captured size a decode step of `num_tokens` runs at, or None if too large."""
        index = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[index] if index < len(self.sizes) else None

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of `size` on the staged inputs; its output `hidden [size, hidden]`."""
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden
