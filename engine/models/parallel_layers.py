"""Megatron-style tensor-parallel layers: each rank holds a slice of every large weight.

- Column-parallel (`PackedLinear`, `ColumnParallelLinear`): a slice of the
  output rows of each logical projection; the output stays sharded (whole
  attention heads, or a slice of the MLP's intermediate size, per rank).
- Row-parallel (`RowParallelLinear`): the matching slice of the input
  columns; each rank's product is a partial sum, all-reduced before the
  replicated bias is added.
- Vocabulary-parallel (`VocabParallelEmbedding`, also the LM head): the
  vocabulary, padded to a multiple of the TP size, is split into contiguous
  ranges. A rank embeds only its own tokens (zeros elsewhere) and the
  embeddings are all-reduced; as the LM head it computes the logits of its
  range, which are all-gathered and unpadded.

The layers size themselves from `get_tp_group()` when built. On one rank
every slice is the whole tensor and every collective the identity.
Checkpoint tensors are always whole: `load_checkpoint(param, part, tensor)`
copies the slice a rank holds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from engine.distributed.communication import all_gather, all_reduce
from engine.distributed.parallel_state import get_tp_group
from engine.models.cpu_weights import linear


@dataclass(frozen=True)
class RowShard:
    """Rows `[start, start + size)` of a checkpoint dimension of `total` rows."""
    start: int
    size: int
    total: int

    @classmethod
    def split(cls, total: int, field: str) -> "RowShard":
        """This rank's equal share of `total`; ValueError naming `field` if it does not divide."""
        group = get_tp_group()
        if total % group.world_size:
            raise ValueError(f"tensor_parallel_size={group.world_size} must divide "
                             f"{field}={total}")
        size = total // group.world_size
        return cls(group.rank * size, size, total)

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This shard of a whole checkpoint `tensor` along `dim`."""
        if tensor.dim() <= dim or tensor.shape[dim] != self.total:
            raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} should have "
                             f"{self.total} rows along dim {dim}")
        return tensor.narrow(dim, self.start, self.size)


@dataclass(frozen=True)
class AttentionHeads:
    """The attention heads of this rank and the projection rows they come from.

    `q_rows` / `kv_rows` index the rows of the whole q and k (or v)
    projections: `num_heads * head_size` and `num_kv_heads * head_size` of them.
    """
    num_heads: int
    num_kv_heads: int
    q_rows: RowShard
    kv_rows: RowShard


def shard_heads(num_heads: int, num_kv_heads: int, head_size: int) -> AttentionHeads:
    """Split the query heads evenly; split the kv heads too, or replicate them.

    With fewer kv heads than ranks (MQA, narrow GQA) each kv head is copied
    to the consecutive ranks whose query heads read it, so that query head
    h still reads kv head h // (num_heads // num_kv_heads).
    """
    group = get_tp_group()
    world, rank = group.world_size, group.rank
    if num_heads % world:
        raise ValueError(f"tensor_parallel_size={world} must divide "
                         f"num_attention_heads={num_heads}")
    if (num_kv_heads >= world and num_kv_heads % world) or \
            (num_kv_heads < world and world % num_kv_heads):
        raise ValueError(f"tensor_parallel_size={world} must divide "
                         f"num_key_value_heads={num_kv_heads} or be a multiple of it")
    local_heads = num_heads // world
    if num_kv_heads >= world:
        local_kv_heads, first_kv_head = num_kv_heads // world, rank * num_kv_heads // world
    else:
        local_kv_heads, first_kv_head = 1, rank // (world // num_kv_heads)
    return AttentionHeads(
        local_heads, local_kv_heads,
        RowShard(rank * local_heads * head_size, local_heads * head_size,
                 num_heads * head_size),
        RowShard(first_kv_head * head_size, local_kv_heads * head_size,
                 num_kv_heads * head_size))


def _copy_checked(target: torch.Tensor, piece: torch.Tensor, what: str) -> None:
    if target.shape != piece.shape:
        raise ValueError(f"checkpoint tensor for {what} has shape {tuple(piece.shape)}, "
                         f"expected {tuple(target.shape)}")
    target.copy_(piece)


class ShardedLayer(abc.ABC):
    """A module whose parameters hold slices of whole checkpoint tensors.

    The checkpoint fills it piece by piece: one piece per name in
    `checkpoint_parts()` (None when one checkpoint tensor fills a parameter).
    """

    def checkpoint_parts(self) -> tuple[Optional[str], ...]:
        return (None,)

    @abc.abstractmethod
    def load_checkpoint(self, param: nn.Parameter, part: Optional[str],
                        tensor: torch.Tensor) -> None:
        """Copy this rank's slice of the whole checkpoint `tensor` into `param`."""


class PackedLinear(ShardedLayer, nn.Linear):
    """A column-parallel Linear whose output rows are several named projections.

    `parts` maps each part's name (as the checkpoint names it, e.g. "q",
    "k", "v") to the rows of that projection this rank holds; the weight
    (and bias) stack those rows in order.
    """

    #: the weight reordered for oneDNN (engine.models.cpu_weights), or None
    packed_weight: Optional[torch.Tensor] = None

    def __init__(self, in_features: int, parts: dict[Optional[str], RowShard], bias: bool):
        super().__init__(in_features, sum(shard.size for shard in parts.values()), bias=bias)
        self.part_shards = dict(parts)
        self.part_offsets: dict[Optional[str], tuple[int, int]] = {}
        offset = 0
        for name, shard in parts.items():
            self.part_offsets[name] = (offset, shard.size)
            offset += shard.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)

    def checkpoint_parts(self) -> tuple[Optional[str], ...]:
        return tuple(self.part_shards)

    def load_checkpoint(self, param: nn.Parameter, part: Optional[str],
                        tensor: torch.Tensor) -> None:
        if part not in self.part_offsets:
            raise ValueError(f"checkpoint part {part!r} is not one of "
                             f"{list(self.part_offsets)}")
        offset, size = self.part_offsets[part]
        _copy_checked(param.data.narrow(0, offset, size),
                      self.part_shards[part].take(tensor, 0), f"part {part!r}")


class ColumnParallelLinear(PackedLinear):
    """A Linear holding the output rows `rows` of one whole checkpoint projection."""

    def __init__(self, in_features: int, rows: RowShard, bias: bool):
        super().__init__(in_features, {None: rows}, bias)


class RowParallelLinear(ShardedLayer, nn.Linear):
    """A Linear holding the input columns `columns`; partial outputs are all-reduced.

    `weight [out_features, columns.size]`; the bias is whole on every rank
    and added once, after the sum.
    """

    packed_weight: Optional[torch.Tensor] = None

    def __init__(self, columns: RowShard, out_features: int, bias: bool):
        super().__init__(columns.size, out_features, bias=bias)
        self.columns = columns
        self.reduce = get_tp_group().world_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            return linear(x, self.weight, self.bias, self.packed_weight)
        out = all_reduce(linear(x, self.weight, None, self.packed_weight))
        return out if self.bias is None else out + self.bias

    def load_checkpoint(self, param: nn.Parameter, part: Optional[str],
                        tensor: torch.Tensor) -> None:
        piece = self.columns.take(tensor, 1) if param is self.weight else tensor
        _copy_checked(param.data, piece, "a row-parallel linear")


class VocabParallelEmbedding(ShardedLayer, nn.Module):
    """Token embedding (and LM head) holding one contiguous range of the vocabulary.

    `weight [vocab_per_rank, hidden_size]`: rows for the tokens
    `vocab_start ..`; the rows past `vocab_size` (padding, last ranks only)
    are zero. The checkpoint tensor is `[vocab_size, hidden_size]`, as
    nn.Embedding and a bias-free nn.Linear LM head both store it.
    """

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        group = get_tp_group()
        self.vocab_size = vocab_size
        self.sharded = group.world_size > 1
        vocab_per_rank = -(-vocab_size // group.world_size)
        self.vocab_start = group.rank * vocab_per_rank
        self.num_real_rows = max(0, min(vocab_per_rank, vocab_size - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(vocab_per_rank, hidden_size))
        #: a copy of the weight reordered for oneDNN, for `logits` (engine.models.cpu_weights)
        self.packed_weight: Optional[torch.Tensor] = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`input_ids [T]` -> `embeddings [T, hidden_size]`."""
        if not self.sharded:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        embeddings = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return all_reduce(embeddings.masked_fill_(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [N, hidden_size]` -> `logits [N, vocab_size]` float32, whole on every rank."""
        logits = linear(hidden, self.weight, None, self.packed_weight)
        if self.sharded:
            logits = all_gather(logits, dim=-1)[:, :self.vocab_size]
        return logits.float()

    def load_checkpoint(self, param: nn.Parameter, part: Optional[str],
                        tensor: torch.Tensor) -> None:
        rows = RowShard(self.vocab_start, self.num_real_rows, self.vocab_size)
        _copy_checked(param.data[:self.num_real_rows], rows.take(tensor, 0), "the vocabulary")
        param.data[self.num_real_rows:].zero_()
