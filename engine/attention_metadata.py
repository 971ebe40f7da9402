"""Per-step attention inputs, built once by the model runner, shared by all layers.

Layouts follow the platform contract (platforms/interface.py):
`slot_mapping [num_tokens]` int64 (-1 = skip), `block_tables
[num_seqs, max_blocks]` int32, `seq_lens [num_seqs]` int32 (cached context +
new tokens), `query_start_loc [num_seqs + 1]` int32. `max_seq_len` and
`max_query_len` are host ints so kernels size their grids without a sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_seq_len: int
    max_query_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
