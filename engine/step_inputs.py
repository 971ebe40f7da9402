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
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Callable

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


def prepare_step_inputs(scheduler_output, get_block_ids: Callable[[str], list[int]],
                        block_size: int, device: torch.device) -> StepInputs:
    """Inputs for `scheduler_output`; chunk i covers tokens num_computed_tokens.. of request i."""
    requests = scheduler_output.scheduled_requests
    num_new = np.fromiter((scheduler_output.num_scheduled_tokens[r.request_id]
                           for r in requests), np.int64, len(requests))
    num_computed = np.fromiter((r.num_computed_tokens for r in requests), np.int64,
                               len(requests))
    token_ids = np.fromiter(
        chain.from_iterable(r.all_token_ids[c:c + n]
                            for r, c, n in zip(requests, num_computed.tolist(), num_new.tolist())),
        np.int64, int(num_new.sum()))
    block_tables = _pad_block_tables([get_block_ids(r.request_id) for r in requests])
    num_known = np.fromiter((r.num_tokens for r in requests), np.int64, len(requests))
    samples = num_computed + num_new >= num_known
    inputs = pack_step_inputs(token_ids, num_computed, num_new, block_tables, samples,
                              block_size, device)
    inputs.sampling_requests = [r for r, s in zip(requests, samples) if s]
    return inputs


def _pad_block_tables(tables: list[list[int]]) -> np.ndarray:
    width = max(1, max(len(t) for t in tables))
    block_tables = np.zeros((len(tables), width), np.int32)
    for row, table in zip(block_tables, tables):
        row[:len(table)] = table
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


def dummy_step_inputs(config, device: torch.device) -> StepInputs:
    """The largest step the scheduler can emit: max_num_batched_tokens of fresh prefill.

    Spread over as many sequences as allowed, each sampling, with block
    tables that number the blocks consecutively from 0.
    """
    num_tokens = config.max_num_batched_tokens
    num_seqs = min(config.max_num_seqs, num_tokens)
    num_new = np.full(num_seqs, num_tokens // num_seqs, np.int64)
    num_new[:num_tokens % num_seqs] += 1
    blocks_per_seq = -(-int(num_new.max()) // config.block_size)
    block_tables = np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(
        num_seqs, blocks_per_seq)
    return pack_step_inputs(np.zeros(num_tokens, np.int64), np.zeros(num_seqs, np.int64),
                            num_new, block_tables, np.ones(num_seqs, bool),
                            config.block_size, device)
