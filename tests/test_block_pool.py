"""Block pool spec: ref counts, free queue order, prefix-cache registry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_pool import BlockPool, hash_block_tokens


def test_allocate_and_free_return_blocks_to_the_pool():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [block.ref_cnt for block in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1 and pool.usage == 0.75
    pool.free(blocks)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0


def test_allocating_more_than_free_raises():
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(ValueError, match="num_blocks=2"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_pool_size_must_be_positive(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(num_blocks)


def test_touch_shares_a_block_until_the_last_owner_frees_it():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.touch([block])  # a fork
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free([block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 2
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block])
    assert block.ref_cnt == 0


def test_hash_chains_parent_tokens_and_extra_keys():
    first = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) == first
    assert hash_block_tokens(first, [3, 4]) == hash_block_tokens(first, (3, 4))
    other_parent = hash_block_tokens(None, [9, 9])
    assert hash_block_tokens(first, [3, 4]) != hash_block_tokens(other_parent, [3, 4])
    assert hash_block_tokens(None, [1, 2], ("lora", 7)) != first


def test_freed_cached_block_stays_findable_until_reused():
    pool = BlockPool(3)
    block_hash = hash_block_tokens(None, [1, 2])
    (cached,) = pool.allocate(1)
    pool.cache_block(cached, block_hash)
    pool.free([cached])
    assert pool.get_cached_block(block_hash) is cached
    # Never-cached blocks are reused first; the cached one is evicted last.
    first_two = pool.allocate(2)
    assert cached not in first_two and pool.get_cached_block(block_hash) is cached
    (evicted,) = pool.allocate(1)
    assert evicted is cached and evicted.block_hash is None
    assert pool.get_cached_block(block_hash) is None


def test_touching_a_free_cached_block_takes_it_out_of_the_free_queue():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache_block(block, hash_block_tokens(None, [5]))
    pool.free([block])
    pool.touch([block])  # a prefix hit
    assert block.ref_cnt == 1 and pool.num_free_blocks == 1
    assert block not in pool.allocate(1)


def test_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.cache_block(block, hash_block_tokens(None, [i]))
    pool.free([blocks[1]])
    pool.free([blocks[2], blocks[0]])
    assert pool.allocate(3) == [blocks[1], blocks[2], blocks[0]]


def test_duplicate_content_keeps_the_first_cached_block():
    pool = BlockPool(2)
    block_hash = hash_block_tokens(None, [1])
    first, second = pool.allocate(2)
    pool.cache_block(first, block_hash)
    pool.cache_block(second, block_hash)
    assert pool.get_cached_block(block_hash) is first and second.block_hash is None


@settings(max_examples=200, deadline=None)
@given(
    num_blocks=st.integers(1, 16),
    ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch", "cache"]),
                           st.integers(0, 15)), max_size=60),
)
def test_random_operations_keep_ref_counts_and_the_free_queue_consistent(num_blocks, ops):
    pool = BlockPool(num_blocks)
    owned = []  # one entry per reference held, like block tables would
    for op, arg in ops:
        if op == "alloc" and arg % 4 <= pool.num_free_blocks:
            owned += pool.allocate(arg % 4)
        elif op == "free" and owned:
            pool.free([owned.pop(arg % len(owned))])
        elif op == "touch":
            block = pool.blocks[arg % num_blocks]
            pool.touch([block])
            owned.append(block)
        elif op == "cache" and owned:
            pool.cache_block(owned[arg % len(owned)], hash_block_tokens(None, [arg]))
        for block in pool.blocks:
            assert block.ref_cnt == sum(b is block for b in owned) >= 0
        assert pool.num_free_blocks == sum(block.ref_cnt == 0 for block in pool.blocks)
        for block in pool.blocks:
            if block.block_hash is not None:
                assert pool.get_cached_block(block.block_hash) is block
    pool.free(owned)
    assert pool.num_free_blocks == num_blocks
