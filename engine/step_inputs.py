"""Flatten one step's scheduled chunks into packed model inputs.

Everything is built with numpy over whole arrays; the only Python loops run
once per request (gathering token-id slices and block tables), never once
per token.

Layouts (T = scheduled tokens, S = scheduled requests, N = sampling rows):
`input_ids [T]` int64, `positions [T]` int64, `logits_indices [N]` int64
(row of each sampling request's last token in the hidden states), and the
`AttentionMetadata` of the platform contract: `slot_mapping [T]` int64,
`block_tables [S, max_blocks]` int32, `seq_lens [S]` int32,
`query_start_loc [S + 1]` int32.

Under tensor parallelism rank 0 gathers the per-request host arrays
(`StepArrays`, numpy) and sends them in a `StepPlan`; every rank packs them
into its own device tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Optional

import numpy as np
import torch

from engine.attention_metadata import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor
    #: the requests that sample this step, in `logits_indices` order
    sampling_requests: list
    #: blocks the step's block tables reference (sizes the profiling cache)
    num_blocks_needed: int


@dataclass
class StepArrays:
    """One step's scheduled chunks as per-request host arrays (S = scheduled requests).

    `token_ids [T]` int64 (the chunks, concatenated), `num_computed [S]` and
    `num_new [S]` int64, `block_tables [S, max_blocks]` int32 (zero-padded),
    `samples [S]` bool (the chunk reaches the end of the request's known
    tokens, so its last row is sampled). A multi-step decode
    (engine.scheduler) has `decode_steps [S]` int64: these arrays describe its
    first step (one token each); request i runs `decode_steps[i]` steps.
    """
    token_ids: np.ndarray
    num_computed: np.ndarray
    num_new: np.ndarray
    block_tables: np.ndarray
    samples: np.ndarray
    decode_steps: Optional[np.ndarray] = None

    def sampling_rows(self) -> np.ndarray:
        """`[N]` int64: the hidden-state row of each sampling chunk's last token."""
        return np.cumsum(self.num_new)[self.samples] - 1

    def pack(self, block_size: int, device: torch.device) -> StepInputs:
        return pack_step_inputs(self.token_ids, self.num_computed, self.num_new,
                                self.block_tables, self.samples, block_size, device)


@dataclass
class StepPlan:
    """What every tensor-parallel rank does in one step, in order (picklable).

    Copy `block_copies` (src, dst) in the KV cache; when `arrays` is set, run
    the forward pass over them; then compute one logits tensor per entry of
    `logits_rows` (`[n]` int64 rows of the hidden states).
    """
    block_copies: list[tuple[int, int]]
    arrays: Optional[StepArrays] = None
    logits_rows: list[np.ndarray] = field(default_factory=list)


def gather_step_arrays(scheduler_output,
                       get_block_ids: Callable[[str], list[int]]) -> tuple[StepArrays, list]:
    """(the step's arrays, the requests that sample, in row order); chunk i covers tokens
    num_computed_tokens.. of scheduled request i."""
    requests = scheduler_output.scheduled_requests
    num_new = np.fromiter((scheduler_output.num_scheduled_tokens[r.request_id]
                           for r in requests), np.int64, len(requests))
    decode_steps = None
    if scheduler_output.decode_steps > 1:
        decode_steps, num_new = num_new, np.ones_like(num_new)
    num_computed = np.fromiter((r.num_computed_tokens for r in requests), np.int64,
                               len(requests))
    token_ids = np.fromiter(
        chain.from_iterable(r.all_token_ids[c:c + n]
                            for r, c, n in zip(requests, num_computed.tolist(), num_new.tolist())),
        np.int64, int(num_new.sum()))
    block_tables = _pad_block_tables([get_block_ids(r.request_id) for r in requests])
    num_known = np.fromiter((r.num_tokens for r in requests), np.int64, len(requests))
    samples = num_computed + num_new >= num_known
    arrays = StepArrays(token_ids, num_computed, num_new, block_tables, samples, decode_steps)
    return arrays, [r for r, s in zip(requests, samples) if s]


def prepare_step_inputs(scheduler_output, get_block_ids: Callable[[str], list[int]],
                        block_size: int, device: torch.device) -> StepInputs:
    """Inputs for `scheduler_output`, packed on `device`."""
    arrays, sampling_requests = gather_step_arrays(scheduler_output, get_block_ids)
    inputs = arrays.pack(block_size, device)
    inputs.sampling_requests = sampling_requests
    return inputs


def _pad_block_tables(tables: list[list[int]]) -> np.ndarray:
    lengths = np.fromiter(map(len, tables), np.int64, len(tables))
    block_tables = np.zeros((len(tables), max(1, int(lengths.max()))), np.int32)
    filled = np.arange(block_tables.shape[1]) < lengths[:, None]
    block_tables[filled] = np.fromiter(chain.from_iterable(tables), np.int32, int(lengths.sum()))
    return block_tables


def pack_step_inputs(token_ids: np.ndarray, num_computed: np.ndarray, num_new: np.ndarray,
                     block_tables: np.ndarray, samples: np.ndarray, block_size: int,
                     device: torch.device) -> StepInputs:
    """The vectorized core: per-request counts -> per-token positions and slots."""
    num_seqs = len(num_new)
    query_start_loc = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(num_new, out=query_start_loc[1:])
    seq_lens = num_computed + num_new
    token_seq = np.repeat(np.arange(num_seqs), num_new)
    positions = np.arange(len(token_ids)) - np.repeat(query_start_loc[:-1] - num_computed,
                                                     num_new)
    slot_mapping = (block_tables[token_seq, positions // block_size].astype(np.int64)
                    * block_size + positions % block_size)
    logits_indices = query_start_loc[1:][samples] - 1

    def to_device(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    attn = AttentionMetadata(
        slot_mapping=to_device(slot_mapping, torch.int64),
        block_tables=to_device(block_tables, torch.int32),
        seq_lens=to_device(seq_lens, torch.int32),
        query_start_loc=to_device(query_start_loc, torch.int32),
        max_seq_len=int(seq_lens.max()), max_query_len=int(num_new.max()))
    return StepInputs(to_device(token_ids, torch.int64), to_device(positions, torch.int64),
                      attn, to_device(logits_indices, torch.int64), [],
                      int(block_tables.max()) + 1)


def decode_steps_max_seq_len(arrays: StepArrays) -> int:
    """The longest sequence a multi-step decode reaches (the backends' grid hint)."""
    return int((arrays.num_computed + arrays.decode_steps).max())


def advance_decode_inputs(inputs: StepInputs, token_ids: torch.Tensor, active: torch.Tensor,
                          block_size: int) -> None:
    """Turn a decode step's inputs into the next step's, in place, on their device.

    Row i (of the first `len(token_ids)`) takes `token_ids[i]` as its input; where
    `active[i]` it moves one position on (its slot from its block table, its seq_len + 1),
    elsewhere it writes no KV (slot -1) and its output is not used.
    """
    num_seqs = token_ids.shape[0]
    attn = inputs.attn
    inputs.input_ids[:num_seqs].copy_(token_ids)
    positions = inputs.positions[:num_seqs]
    positions.add_(active)
    attn.seq_lens[:num_seqs].add_(active)
    blocks = attn.block_tables[:num_seqs].gather(1, (positions // block_size)[:, None])
    slots = blocks[:, 0].to(torch.int64) * block_size + positions % block_size
    attn.slot_mapping[:num_seqs].copy_(slots.masked_fill_(~active, -1))


def dummy_step_inputs(config, device: torch.device) -> StepInputs:
    """The largest step the scheduler can emit: max_num_batched_tokens of fresh prefill.

    Spread over as many sequences as allowed (none longer than max_model_len,
    so fewer tokens when max_num_seqs sequences cannot hold them), each
    sampling, with block tables that number the blocks consecutively from 0.
    """
    num_tokens = min(config.max_num_batched_tokens, config.max_num_seqs * config.max_model_len)
    num_seqs = min(config.max_num_seqs, num_tokens)
    num_new = np.full(num_seqs, num_tokens // num_seqs, np.int64)
    num_new[:num_tokens % num_seqs] += 1
    blocks_per_seq = -(-int(num_new.max()) // config.block_size)
    block_tables = np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(
        num_seqs, blocks_per_seq)
    return pack_step_inputs(np.zeros(num_tokens, np.int64), np.zeros(num_seqs, np.int64),
                            num_new, block_tables, np.ones(num_seqs, bool),
                            config.block_size, device)
