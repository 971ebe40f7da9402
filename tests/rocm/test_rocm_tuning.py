"""Launch shapes and the split-KV decision of the Triton attention kernels."""

from __future__ import annotations

import itertools

import pytest
import triton

from platforms.rocm import tuning
from platforms.rocm.triton_attention import num_query_tiles


@pytest.mark.parametrize("backend,head_size,group,max_query_len,itemsize", list(
    itertools.product(["hip", "cuda"], [64, 80, 256], [1, 6, 64], [1, 3, 2048], [2, 4])))
def test_a_program_holds_whole_kv_groups_in_a_dot_sized_row_block(backend, head_size, group,
                                                                  max_query_len, itemsize):
    config = tuning.attention_config(backend, head_size, group, max_query_len, itemsize)
    assert config.block_m >= tuning.MIN_DOT_ROWS
    assert config.block_m & (config.block_m - 1) == 0, "power of two"
    assert 1 <= config.block_q * group <= config.block_m
    assert config.block_q <= triton.next_power_of_2(max_query_len), "past the longest query"
    assert config.tile_n >= tuning.MIN_DOT_ROWS
    assert config.tile_n * triton.next_power_of_2(head_size) * itemsize <= tuning.KV_TILE_BYTES


def test_decode_uses_one_token_per_program():
    for backend in ("hip", "cuda"):
        assert tuning.attention_config(backend, 128, 4, 1, itemsize=2).block_q == 1


@pytest.mark.parametrize("query_lens,block_q", [
    ([1] * 7, 1), ([5, 0, 16, 1, 33], 16), ([3, 3, 3], 4), ([0, 0, 9], 8)])
def test_every_sequence_gets_enough_query_tiles(query_lens, block_q):
    starts = [sum(query_lens[:i]) for i in range(len(query_lens) + 1)]
    first = [(start + seq * (block_q - 1)) // block_q for seq, start in enumerate(starts)]
    for seq, query_len in enumerate(query_lens):
        assert first[seq + 1] - first[seq] >= -(-query_len // block_q)
    assert first[-1] == num_query_tiles(sum(query_lens), len(query_lens), block_q)


def test_split_kv_only_for_long_decode_on_an_underfilled_device():
    assert tuning.num_kv_splits(4, 8, 4096, 1, compute_units=304) == tuning.MAX_KV_SPLITS
    assert tuning.num_kv_splits(4, 8, 1024, 1, compute_units=304) == 4, "256+ keys a split"
    assert tuning.num_kv_splits(12, 8, 4096, 1, compute_units=132) == 3
    assert tuning.num_kv_splits(4, 8, 4096, 2, compute_units=304) == 1, "not decode"
    assert tuning.num_kv_splits(4, 8, 300, 1, compute_units=304) == 1, "short context"
    assert tuning.num_kv_splits(32, 8, 2048, 1, compute_units=132) == 1, "device full"
