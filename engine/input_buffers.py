"""Preallocated host and device buffers that carry one step's inputs in a single copy.

Every array of a step's `StepInputs` (engine.step_inputs) is written into its
region of one pinned host byte buffer; the used prefix of that buffer goes to
a device byte buffer of the same layout in one asynchronous copy, and the
step's tensors are views of the device buffer. Regions, in order, each
aligned to `ALIGN` bytes:

    input_ids, positions, slot_mapping   [max_num_tokens] int64
    logits_indices                       [max_num_seqs] int64
    seq_lens                             [max_num_seqs] int32
    query_start_loc                      [max_num_seqs + 1] int32
    block_tables                         [max_num_seqs * max_blocks_per_seq] int32,
                                         row-major [S, width] with the step's width

CUDA graphs need inputs at fixed addresses: `stage(..., pad_to=B)` pads the
step to B sequences of one token each (padding: slot -1, so nothing is
written; seq_len 0, so nothing is read) and copies the block table into
`graph_block_tables [max_num_seqs, max_blocks_per_seq]`, whose rows past the
step's width and past its sequences are never read. `graph_inputs(B)` gives
the same views for capture.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.attention_metadata import AttentionMetadata
from engine.step_inputs import StepInputs

ALIGN = 256

_FIELDS = (("input_ids", torch.int64), ("positions", torch.int64),
           ("slot_mapping", torch.int64), ("logits_indices", torch.int64),
           ("seq_lens", torch.int32), ("query_start_loc", torch.int32),
           ("block_tables", torch.int32))


class InputBuffers:
    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 max_seq_len: int, device: torch.device):
        capacity = {"input_ids": max_num_tokens, "positions": max_num_tokens,
                    "slot_mapping": max_num_tokens, "logits_indices": max_num_seqs,
                    "seq_lens": max_num_seqs, "query_start_loc": max_num_seqs + 1,
                    "block_tables": max_num_seqs * max_blocks_per_seq}
        self.offsets: dict[str, int] = {}
        size = 0
        for name, dtype in _FIELDS:
            self.offsets[name] = size
            size += -(-capacity[name] * dtype.itemsize // ALIGN) * ALIGN
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_seq_len = max_seq_len
        on_gpu = device.type == "cuda"
        self.host = torch.empty(size, dtype=torch.uint8, pin_memory=on_gpu)
        self.staged = torch.empty(size, dtype=torch.uint8, device=device)
        self.graph_block_tables = torch.zeros((max_num_seqs, max_blocks_per_seq),
                                              dtype=torch.int32, device=device)
        # The host buffer is rewritten only after the previous copy has read it.
        self._copied = torch.cuda.Event() if on_gpu else None

    def _view(self, buffer: torch.Tensor, name: str, dtype: torch.dtype,
              numel: int) -> torch.Tensor:
        start = self.offsets[name]
        return buffer[start:start + numel * dtype.itemsize].view(dtype)

    def stage(self, inputs: StepInputs, pad_to: int | None = None) -> StepInputs:
        """`inputs` (host tensors) as views of the device buffer, after one async copy.

        With `pad_to`, the step must be decode-shaped (one token per sequence) and
        comes back padded to `pad_to` sequences, reading `graph_block_tables`.
        """
        attn = inputs.attn
        num_tokens, num_seqs = inputs.input_ids.shape[0], attn.seq_lens.shape[0]
        arrays = {"input_ids": inputs.input_ids, "positions": inputs.positions,
                  "slot_mapping": attn.slot_mapping, "logits_indices": inputs.logits_indices,
                  "seq_lens": attn.seq_lens, "query_start_loc": attn.query_start_loc,
                  "block_tables": attn.block_tables.reshape(-1)}
        lengths = {name: array.shape[0] for name, array in arrays.items()}
        if pad_to is not None:
            lengths.update(input_ids=pad_to, positions=pad_to, slot_mapping=pad_to,
                           seq_lens=pad_to, query_start_loc=pad_to + 1)
        if self._copied is not None:
            self._copied.synchronize()
        for name, dtype in _FIELDS:
            self._view(self.host, name, dtype, arrays[name].shape[0]).copy_(arrays[name])
        if pad_to is not None:
            self._pad(num_seqs, pad_to)
        end = self.offsets["block_tables"] + attn.block_tables.numel() * 4
        self.staged[:end].copy_(self.host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        views = {name: self._view(self.staged, name, dtype, lengths[name])
                 for name, dtype in _FIELDS}
        block_tables = views["block_tables"].view(attn.block_tables.shape)
        max_seq_len = attn.max_seq_len
        if pad_to is not None:
            self.graph_block_tables[:num_seqs, :block_tables.shape[1]].copy_(block_tables)
            block_tables = self.graph_block_tables[:pad_to]
            max_seq_len = self.max_seq_len
        return replace(
            inputs, input_ids=views["input_ids"], positions=views["positions"],
            logits_indices=views["logits_indices"],
            attn=AttentionMetadata(views["slot_mapping"], block_tables, views["seq_lens"],
                                   views["query_start_loc"], max_seq_len,
                                   attn.max_query_len))

    def _pad(self, num_seqs: int, pad_to: int) -> None:
        """Fill host rows num_seqs..pad_to with one empty-context token each."""
        def tail(name: str, dtype: torch.dtype, length: int = pad_to) -> torch.Tensor:
            return self._view(self.host, name, dtype, length)[num_seqs:]

        tail("input_ids", torch.int64).zero_()
        tail("positions", torch.int64).zero_()
        tail("slot_mapping", torch.int64).fill_(-1)
        tail("seq_lens", torch.int32).zero_()
        torch.arange(num_seqs + 1, pad_to + 1, dtype=torch.int32,
                     out=tail("query_start_loc", torch.int32, pad_to + 1)[1:])

    def graph_inputs(self, batch_size: int) -> StepInputs:
        """Decode inputs of `batch_size` empty-context tokens at the graphs' fixed addresses."""
        seqs = torch.arange(batch_size + 1, dtype=torch.int32)
        idle = StepInputs(
            input_ids=torch.zeros(batch_size, dtype=torch.int64),
            positions=torch.zeros(batch_size, dtype=torch.int64),
            attn=AttentionMetadata(
                slot_mapping=torch.full((batch_size,), -1, dtype=torch.int64),
                block_tables=torch.zeros((batch_size, 1), dtype=torch.int32),
                seq_lens=torch.zeros(batch_size, dtype=torch.int32),
                query_start_loc=seqs, max_seq_len=self.max_seq_len, max_query_len=1),
            logits_indices=seqs[:0].long(), sampling_requests=[], num_blocks_needed=1)
        return self.stage(idle, pad_to=batch_size)
