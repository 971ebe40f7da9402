"""The conformance matrix, as data.

A `Case` is one dtype x head_size x block_size x (num_heads, num_kv_heads)
x batch shape; every backend of every platform runs the same cases (those
outside a backend's `supported_dtypes` / `supported_head_sizes` are
reported as skipped). `FULL` is the whole cross product; `QUICK` is an
all-pairs subset of it (every pair of values of any two axes appears in
some case), and a platform whose rows are slow (e.g. Triton in the
interpreter) names its own quick subset in `PLATFORM_QUICK`.

A batch shape lists its sequences as (cached context tokens, new query
tokens): context 0 is a prefill, query 1 over a context is a decode, more
query tokens over a context is a chunked prefill.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

#: allowed error vs the float64 oracle, by dtype, in the metric of
#: `ci.conformance.compare` (worst per-(token, head) normalized error)
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class BatchShape:
    """One step's sequences, each as (cached context tokens, new query tokens).

    `hints`: whether the runner passes `max_seq_len` / `max_query_len` to
    `forward` (the engine does) or None (the backend must compute them).
    """

    name: str
    seqs: tuple[tuple[int, int], ...]
    hints: bool = True


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    head_size: int
    block_size: int
    num_heads: int
    num_kv_heads: int
    batch: BatchShape

    @property
    def id(self) -> str:
        return (f"{_DTYPE_NAMES[self.dtype]}-d{self.head_size}-b{self.block_size}"
                f"-h{self.num_heads}/{self.num_kv_heads}-{self.batch.name}")

    @property
    def seed(self) -> int:
        """Stable across runs and processes (unlike `hash`)."""
        return zlib.crc32(self.id.encode())

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.dtype]


PREFILL = BatchShape("prefill", ((0, 1), (0, 19), (0, 64), (0, 130)))
DECODE = BatchShape("decode", ((1, 1), (7, 1), (16, 1), (31, 1), (257, 1), (2100, 1)),
                    hints=False)
MIXED = BatchShape("mixed", ((0, 23), (1, 5), (100, 28), (2049, 1), (15, 1), (0, 1),
                             (600, 64)))
LONG_CHUNKED = BatchShape("long-chunked", ((2200, 48), (1500, 1), (40, 17)), hints=False)
#: a few short sequences, for kernels that run in a slow interpreter
TINY_MIXED = BatchShape("tiny-mixed", ((0, 5), (9, 3), (20, 1)))


@dataclass(frozen=True)
class Matrix:
    """Axes of cases; `all_pairs` keeps a pairwise-covering subset of the product."""

    dtypes: tuple[torch.dtype, ...]
    head_sizes: tuple[int, ...]
    block_sizes: tuple[int, ...]
    head_configs: tuple[tuple[int, int], ...]
    batch_shapes: tuple[BatchShape, ...]
    all_pairs: bool = False

    def cases(self) -> list[Case]:
        axes = [self.dtypes, self.head_sizes, self.block_sizes, self.head_configs,
                self.batch_shapes]
        combos = _all_pairs(axes) if self.all_pairs else itertools.product(*axes)
        return [Case(dtype, head_size, block_size, heads, kv_heads, batch)
                for dtype, head_size, block_size, (heads, kv_heads), batch in combos]


FULL = Matrix(
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    head_sizes=(64, 80, 128, 256),
    block_sizes=(8, 16, 32),
    head_configs=((8, 8), (8, 2), (32, 8), (16, 1)),
    batch_shapes=(PREFILL, DECODE, MIXED, LONG_CHUNKED),
)
QUICK = Matrix(FULL.dtypes, FULL.head_sizes, FULL.block_sizes, FULL.head_configs,
               FULL.batch_shapes, all_pairs=True)
TINY = Matrix(dtypes=(torch.float16,), head_sizes=(64,), block_sizes=(16,),
              head_configs=((8, 2),), batch_shapes=(TINY_MIXED,))

#: a platform's own `--quick` subset (default: `QUICK`); one line per platform.
#: rocm's Triton kernels run in the interpreter without a GPU (~60 ms a tl.dot).
PLATFORM_QUICK: dict[str, Matrix] = {
    "rocm": TINY,
}


def cases(platform: Optional[str] = None, quick: bool = False) -> list[Case]:
    """The cases `platform` runs: the full matrix, or its quick subset."""
    if not quick:
        return FULL.cases()
    return PLATFORM_QUICK.get(platform or "", QUICK).cases()


def _all_pairs(axes: list[tuple]) -> list[tuple]:
    """A small subset of the product covering every pair of values of two axes.

    Greedy: repeatedly take the first combination of the product that covers
    the most still-uncovered pairs. Deterministic.
    """
    def pairs(combo: tuple[int, ...]) -> set[tuple[int, int, int, int]]:
        return {(i, combo[i], j, combo[j])
                for i, j in itertools.combinations(range(len(combo)), 2)}

    candidates = list(itertools.product(*(range(len(axis)) for axis in axes)))
    uncovered = set().union(*(pairs(combo) for combo in candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda combo: len(pairs(combo) & uncovered))
        uncovered -= pairs(best)
        chosen.append(best)
    return [tuple(axis[index] for axis, index in zip(axes, combo)) for combo in chosen]
