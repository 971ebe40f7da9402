"""What every native model shares: logits, checkpoint loading, KV cache sizes.

A model maps each Hugging Face checkpoint tensor to its own parameters with
`checkpoint_to_params` (renames, transposes, splits of fused tensors into the
parts of a `PackedLinear`); `load_weights` copies the pieces in and checks that
every parameter (every part of a packed one) was filled exactly as shaped.
Sharded layers (`engine.models.parallel_layers`) copy only the slice of each
whole checkpoint tensor that their tensor-parallel rank holds.
"""

from __future__ import annotations

import abc
from typing import Any, Iterable, Optional

import torch
from torch import nn

from engine.models.parallel_layers import ShardedLayer, VocabParallelEmbedding

#: (parameter name, part of a PackedLinear or None, tensor to copy in)
ParamPiece = tuple[str, Optional[str], torch.Tensor]


class CausalLM(nn.Module, abc.ABC):
    """Base of the native decoder-only models (see the engine API).

    Subclasses build their layers, set `num_layers`, `num_kv_heads`, `head_size`,
    `lm_head` (None when the output projection is the tied input embedding) and
    implement `forward`, `input_embedding` and `checkpoint_to_params`.
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    lm_head: Optional[VocabParallelEmbedding]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))

    @abc.abstractmethod
    def input_embedding(self) -> VocabParallelEmbedding:
        """The token embedding (also the output projection when tied)."""

    @abc.abstractmethod
    def checkpoint_to_params(self, name: str, tensor: torch.Tensor) -> list[ParamPiece]:
        """The pieces of this model's parameters that checkpoint tensor `name` fills."""

    def check_kv_caches(self, kv_caches: list) -> None:
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} entries, the model has "
                             f"{self.num_layers} layers")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [N, hidden_size]` -> `logits [N, vocab_size]` float32 (on every rank)."""
        head = self.input_embedding() if self.lm_head is None else self.lm_head
        return head.logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors in; ValueError on unknown or missing ones."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, Optional[str]]] = set()
        for name, tensor in weights:
            for param_name, part, piece in self.checkpoint_to_params(name, tensor):
                if param_name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} matches no parameter "
                                     f"of {type(self).__name__} (looked for {param_name!r})")
                self._copy_piece(param_name, params[param_name], part, piece)
                loaded.add((param_name, part))
        missing = sorted(f"{n}[{s}]" if s else n
                         for n, s in self._expected_pieces(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing)}")

    def _owner(self, param_name: str) -> nn.Module:
        return self.get_submodule(param_name.rpartition(".")[0])

    def _copy_piece(self, param_name: str, param: nn.Parameter, part: Optional[str],
                    piece: torch.Tensor) -> None:
        owner = self._owner(param_name)
        if isinstance(owner, ShardedLayer):
            owner.load_checkpoint(param, part, piece)
            return
        if param.shape != piece.shape:
            raise ValueError(f"checkpoint tensor for {param_name!r} has shape "
                             f"{tuple(piece.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(piece)

    def _expected_pieces(self, params: dict[str, nn.Parameter]) -> set[tuple[str, Optional[str]]]:
        expected: set[tuple[str, Optional[str]]] = set()
        for name in params:
            owner = self._owner(name)
            parts = owner.checkpoint_parts() if isinstance(owner, ShardedLayer) else (None,)
            expected.update((name, part) for part in parts)
        return expected
