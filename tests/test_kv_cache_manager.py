"""KV cache manager spec: block tables, prefix hits, fork + copy-on-write, waste."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from fake_model import FakeSamplingParams

BLOCK_SIZE = 4


def make_request(request_id, num_tokens, first_token=1):
    prompt = list(range(first_token, first_token + num_tokens))
    return Request(request_id, prompt, FakeSamplingParams())


def compute(request, num_tokens):
    """What the scheduler does after a step: the tokens are now in the cache."""
    request.num_computed_tokens += num_tokens


@pytest.mark.parametrize("num_tokens, num_blocks", [(1, 1), (4, 1), (5, 2), (12, 3)])
def test_allocate_slots_gives_one_block_per_block_size_tokens(num_tokens, num_blocks):
    kv = KVCacheManager(8, BLOCK_SIZE)
    request = make_request("a", num_tokens)
    new_blocks = kv.allocate_slots(request, num_tokens)
    assert len(new_blocks) == num_blocks
    assert kv.get_block_ids("a") == [block.block_id for block in new_blocks]
    assert kv.num_free_blocks == 8 - num_blocks


def test_allocate_slots_grows_the_table_only_at_block_boundaries():
    kv = KVCacheManager(8, BLOCK_SIZE)
    request = make_request("a", 3)
    kv.allocate_slots(request, 3)
    compute(request, 3)
    request.append_output_token_ids(4)
    assert kv.allocate_slots(request, 1) == []  # 4th slot of block 0
    compute(request, 1)
    request.append_output_token_ids(5)
    assert len(kv.allocate_slots(request, 1)) == 1
    assert len(kv.get_block_ids("a")) == 2


def test_allocate_slots_returns_none_and_changes_nothing_when_short():
    kv = KVCacheManager(2, BLOCK_SIZE)
    assert kv.allocate_slots(make_request("a", 4), 4) is not None
    request = make_request("b", 8)
    assert kv.allocate_slots(request, 8) is None
    assert kv.get_block_ids("b") == [] and kv.num_free_blocks == 1
    for num_new_tokens in (0, 9):
        with pytest.raises(ValueError, match="num_new_tokens"):
            kv.allocate_slots(request, num_new_tokens)


def test_free_returns_every_block():
    kv = KVCacheManager(4, BLOCK_SIZE)
    request = make_request("a", 10)
    kv.allocate_slots(request, 10)
    compute(request, 10)
    kv.free(request)
    assert kv.num_free_blocks == 4 and kv.usage == 0.0 and kv.get_block_ids("a") == []


def run_prefill(kv, request):
    computed_blocks, num_cached = kv.get_computed_blocks(request)
    kv.allocate_slots(request, request.num_tokens - num_cached, computed_blocks)
    request.num_computed_tokens = request.num_tokens
    return computed_blocks, num_cached


def test_same_three_block_prefix_reuses_the_blocks():
    kv = KVCacheManager(16, BLOCK_SIZE)
    first = make_request("first", 3 * BLOCK_SIZE + 2)
    run_prefill(kv, first)
    kv.free(first)
    second = make_request("second", 3 * BLOCK_SIZE + 3)
    computed_blocks, num_cached = run_prefill(kv, second)
    assert num_cached == 3 * BLOCK_SIZE
    assert kv.get_block_ids("second")[:3] == [b.block_id for b in computed_blocks]
    assert kv.prefix_cache_queries == first.num_tokens + second.num_tokens
    assert kv.prefix_cache_hits == 3 * BLOCK_SIZE


def test_running_requests_share_cached_prefix_blocks():
    kv = KVCacheManager(16, BLOCK_SIZE)
    first, second = make_request("first", 9), make_request("second", 9)
    run_prefill(kv, first)
    first.append_output_token_ids(7)
    kv.allocate_slots(first, 1)  # registers the two computed full blocks
    run_prefill(kv, second)
    shared = kv.get_block_ids("first")[:2]
    assert kv.get_block_ids("second")[:2] == shared
    assert [kv.block_pool.blocks[b].ref_cnt for b in shared] == [2, 2]


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_prefix_caching_can_be_switched_off(enable_prefix_caching):
    kv = KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching)
    first = make_request("first", 9)
    run_prefill(kv, first)
    kv.free(first)
    _, num_cached = kv.get_computed_blocks(make_request("second", 9))
    assert num_cached == (8 if enable_prefix_caching else 0)


def test_hit_stops_at_the_first_differing_block_and_never_covers_all_tokens():
    kv = KVCacheManager(16, BLOCK_SIZE)
    first = make_request("first", 12)
    run_prefill(kv, first)
    kv.free(first)
    prompt = list(first.prompt_token_ids)
    prompt[5] = 99
    differs_in_block_1 = Request("x", prompt, FakeSamplingParams())
    assert kv.get_computed_blocks(differs_in_block_1)[1] == BLOCK_SIZE
    assert kv.get_computed_blocks(make_request("same", 12))[1] == 2 * BLOCK_SIZE


def test_extra_keys_separate_the_cache():
    kv = KVCacheManager(16, BLOCK_SIZE)
    first = make_request("first", 9)
    run_prefill(kv, first)
    kv.free(first)
    lora = Request("lora", first.prompt_token_ids, FakeSamplingParams(), extra_keys=(1,))
    assert kv.get_computed_blocks(lora) == ([], 0)


def forked_pair(num_tokens):
    kv = KVCacheManager(16, BLOCK_SIZE)
    parent = make_request("parent", num_tokens)
    run_prefill(kv, parent)
    child = make_request("child", num_tokens)
    child.num_computed_tokens = parent.num_computed_tokens
    kv.fork(parent, child)
    return kv, parent, child


def test_fork_shares_every_block():
    kv, _, _ = forked_pair(10)
    assert kv.get_block_ids("child") == kv.get_block_ids("parent")
    assert [b.ref_cnt for b in kv.block_pool.blocks if b.ref_cnt] == [2, 2, 2]
    assert kv.num_free_blocks == 13


def test_first_divergent_append_copies_only_the_partial_last_block():
    kv, parent, child = forked_pair(10)  # blocks: full, full, 2 of 4 used
    shared = kv.get_block_ids("parent")
    child.append_output_token_ids(50)
    assert kv.allocate_slots(child, 1) == []
    child_blocks = kv.get_block_ids("child")
    assert kv.take_block_copies() == [(shared[2], child_blocks[2])]
    assert child_blocks[:2] == shared[:2] and child_blocks[2] != shared[2]
    # The parent now owns its partial block alone: no second copy.
    parent.append_output_token_ids(60)
    kv.allocate_slots(parent, 1)
    assert kv.take_block_copies() == []
    assert kv.get_block_ids("parent") == shared


def test_fork_at_a_block_boundary_needs_no_copy():
    kv, _, child = forked_pair(8)
    child.append_output_token_ids(50)
    assert len(kv.allocate_slots(child, 1)) == 1
    assert kv.take_block_copies() == []


def test_copy_on_write_fails_cleanly_when_the_pool_is_empty():
    kv, parent, child = forked_pair(10)
    kv.block_pool.allocate(kv.num_free_blocks)
    child.append_output_token_ids(50)
    assert kv.allocate_slots(child, 1) is None
    assert kv.get_block_ids("child") == kv.get_block_ids("parent")


def test_freeing_a_request_drops_its_pending_copies():
    kv, _, child = forked_pair(10)
    child.append_output_token_ids(50)
    kv.allocate_slots(child, 1)
    kv.free(child)
    assert kv.take_block_copies() == []


def test_kv_waste_is_unused_allocated_slots_over_allocated_slots():
    kv = KVCacheManager(16, BLOCK_SIZE)
    assert kv.kv_waste() == 0.0
    kv.allocate_slots(make_request("a", 5), 5)  # 2 blocks, 3 slots unused
    kv.allocate_slots(make_request("b", 4), 4)  # 1 full block
    assert kv.kv_waste() == pytest.approx(3 / 12)


def test_shared_blocks_count_once_in_waste():
    kv, _, _ = forked_pair(10)
    assert kv.kv_waste() == pytest.approx(2 / 12)


@settings(max_examples=100, deadline=None)
@given(
    num_blocks=st.integers(1, 24),
    block_size=st.sampled_from([1, 2, 3, 8]),
    chunks=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 9)), max_size=40),
)
def test_random_allocations_never_leak_or_overcommit(num_blocks, block_size, chunks):
    kv = KVCacheManager(num_blocks, block_size)
    requests = [make_request(f"r{i}", 40, first_token=i % 2) for i in range(4)]
    for index, num_tokens in chunks:
        request = requests[index]
        num_tokens = min(num_tokens, request.num_tokens - request.num_computed_tokens)
        if num_tokens == 0:
            kv.free(request)
            request.num_computed_tokens = 0
            continue
        computed, num_cached = ([], 0)
        if not kv.get_block_ids(request.request_id):
            computed, num_cached = kv.get_computed_blocks(request)
            num_tokens = min(num_tokens, request.num_tokens - num_cached)
        if kv.allocate_slots(request, num_tokens, computed) is not None:
            request.num_computed_tokens = num_cached + request.num_computed_tokens + num_tokens
            table = kv.get_block_ids(request.request_id)
            assert len(table) * block_size >= request.num_computed_tokens
        assert all(block.ref_cnt >= 0 for block in kv.block_pool.blocks)
        assert kv.num_free_blocks >= 0 and 0.0 <= kv.usage <= 1.0
    for request in requests:
        kv.free(request)
    assert kv.num_free_blocks == num_blocks
