"""Scheduler spec, driven by a fake model runner with a simulated KV cache."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler, SchedulerConfig
from fake_model import (
    VOCAB_SIZE,
    FakeRunner,
    FakeSamplingParams,
    check_block_accounting,
    expected_output,
    fake_token,
    step,
)

EOS = 0


def make_scheduler(num_blocks, block_size, prefix_caching=True, **config):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(SchedulerConfig(**config), kv)
    return scheduler, FakeRunner(kv)


def make_request(request_id, prompt, max_tokens=8, arrival_time=0.0, priority=0, **params):
    params = FakeSamplingParams(max_tokens=max_tokens, **params)
    return Request(request_id, prompt, params, EOS, arrival_time, priority)


def run_until_done(scheduler, runner, max_steps):
    for num_steps in range(1, max_steps + 1):
        step(scheduler, runner)
        check_block_accounting(scheduler)
        if not scheduler.has_unfinished_requests():
            return num_steps
    raise AssertionError(f"not finished after {max_steps} steps")


def never_fits(prompt_len, max_tokens, config, num_blocks, block_size):
    if prompt_len == 0 or prompt_len > config.max_model_len:
        return True
    if not config.enable_chunked_prefill and prompt_len > config.max_num_batched_tokens:
        return True
    max_len = min(config.max_model_len, prompt_len + max_tokens)
    return cdiv(max_len, block_size) > num_blocks


@st.composite
def workloads(draw):
    """A pool, a config and requests arriving (and maybe aborted) at given steps."""
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    num_blocks = max(1, draw(st.integers(16, 160)) // block_size)
    config = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 48)),
        max_model_len=draw(st.integers(16, 64)),
        enable_chunked_prefill=draw(st.booleans()),
    )
    shared = draw(st.lists(st.integers(1, VOCAB_SIZE - 1), min_size=24, max_size=24))
    requests = []
    for i in range(draw(st.integers(1, 12))):
        prompt = shared[: draw(st.integers(0, 24))] + draw(
            st.lists(st.integers(1, VOCAB_SIZE - 1), max_size=8)
        )
        params = dict(
            max_tokens=draw(st.integers(1, 20)),
            min_tokens=draw(st.integers(0, 3)),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=draw(st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=2)),
        )
        request = make_request(f"r{i}", prompt, arrival_time=float(i),
                               priority=draw(st.integers(0, 2)), **params)
        arrival = draw(st.integers(0, 8))
        abort = draw(st.none() | st.integers(arrival, arrival + 30))
        requests.append((request, arrival, abort))
    forks = draw(st.lists(st.tuples(st.integers(0, len(requests) - 1),
                                    st.integers(1, 12)), max_size=4))
    return num_blocks, block_size, draw(st.booleans()), config, requests, forks


def fork_if_running(scheduler, parent, child_id):
    """Fork a running parent; returns the child and its inherited output length."""
    if parent.status != RequestStatus.RUNNING or parent.num_computed_tokens == 0:
        return None
    child = Request(child_id, parent.prompt_token_ids, parent.sampling_params, EOS,
                    parent.arrival_time, parent.priority)
    child.append_output_token_ids(list(parent.output_token_ids))
    scheduler.fork_request(parent, child)
    return child, parent.num_output_tokens


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_finish_with_expected_tokens_and_no_leaks(workload):
    num_blocks, block_size, prefix_caching, config, requests, forks = workload
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    scheduler, runner = Scheduler(config, kv), FakeRunner(kv)
    accepted, aborted, children = [], set(), []
    num_block_copies = 0
    for step_index in range(3000):
        for parent_index, fork_step in forks:
            if fork_step == step_index:
                child_id = f"child{len(children)}"
                forked = fork_if_running(scheduler, requests[parent_index][0], child_id)
                children += [forked] if forked else []
        for request, arrival, abort in requests:
            if arrival == step_index:
                max_tokens = request.max_tokens
                if never_fits(request.num_prompt_tokens, max_tokens, config,
                              num_blocks, block_size):
                    with pytest.raises(ValueError, match="prompt_token_ids"):
                        scheduler.add_request(request)
                else:
                    scheduler.add_request(request)
                    accepted.append(request)
            if abort == step_index and request.request_id in scheduler.requests:
                scheduler.finish_requests(request.request_id,
                                          RequestStatus.FINISHED_ABORTED)
                aborted.add(request.request_id)
        if step_index > 8 and not scheduler.has_unfinished_requests():
            break
        num_block_copies += len(step(scheduler, runner).block_copies)
        check_block_accounting(scheduler)
    else:
        raise AssertionError("workload did not finish in 3000 steps")
    event(f"preempted: {scheduler.num_preemptions > 0}")
    event(f"prefix hits: {kv.prefix_cache_hits > 0}")
    event(f"block copies: {num_block_copies > 0}")
    event(f"aborted: {bool(aborted)}")
    event(f"half or more rejected: {len(accepted) <= len(requests) / 2}")

    assert kv.num_free_blocks == num_blocks
    assert scheduler.requests == {}
    for request in accepted:
        expected = expected_output(request, config.max_model_len)
        if request.request_id in aborted:
            assert request.status == RequestStatus.FINISHED_ABORTED
            assert request.output_token_ids == expected[: request.num_output_tokens]
        else:
            assert request.output_token_ids == expected
            assert request.finish_reason in ("stop", "length")
    for child, num_inherited in children:
        expected = expected_output(child, config.max_model_len, num_inherited)
        assert child.output_token_ids == expected


@pytest.mark.parametrize(
    "prompt_len, max_tokens, config, match",
    [
        (0, 4, {}, "empty"),
        (65, 1, {"max_model_len": 64}, "max_model_len=64"),
        (40, 1, {"enable_chunked_prefill": False, "max_num_batched_tokens": 32},
         "max_num_batched_tokens=32"),
        (60, 8, {}, "8 blocks x 8 slots"),  # 68 tokens > 64 slots in the pool
        (65, 0, {"max_model_len": 128}, "8 blocks x 8 slots"),
    ],
)
def test_request_that_can_never_fit_is_rejected(prompt_len, max_tokens, config, match):
    scheduler, _ = make_scheduler(8, 8, **config)
    request = make_request("big", list(range(1, prompt_len + 1)), max_tokens=max_tokens)
    with pytest.raises(ValueError, match=match):
        scheduler.add_request(request)
    assert not scheduler.has_unfinished_requests()


def test_duplicate_request_id_is_rejected():
    scheduler, _ = make_scheduler(8, 8)
    scheduler.add_request(make_request("a", [1, 2, 3]))
    with pytest.raises(ValueError, match="request_id 'a'"):
        scheduler.add_request(make_request("a", [4, 5]))


def test_prefix_hit_reuses_three_blocks_and_schedules_only_the_rest():
    block_size = 4
    scheduler, runner = make_scheduler(32, block_size)
    prefix = [random.randrange(1, VOCAB_SIZE) for _ in range(3 * block_size)]
    first = make_request("first", prefix + [5, 6], max_tokens=2)
    scheduler.add_request(first)
    run_until_done(scheduler, runner, 10)
    kv = scheduler.kv_cache_manager
    hits_before = kv.prefix_cache_hits

    second = make_request("second", prefix + [7, 8, 9], max_tokens=2)
    scheduler.add_request(second)
    output = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"second": 3}
    assert kv.prefix_cache_hits - hits_before == 3 * block_size
    run_until_done(scheduler, runner, 10)
    assert second.output_token_ids == expected_output(second, 2048)


def test_prefix_hit_never_covers_the_whole_prompt():
    scheduler, runner = make_scheduler(32, 4)
    prompt = list(range(1, 13))  # exactly 3 blocks
    scheduler.add_request(make_request("a", prompt, max_tokens=1))
    run_until_done(scheduler, runner, 5)
    scheduler.add_request(make_request("b", prompt, max_tokens=1))
    # "b" hits 2 blocks and recomputes the last block to get logits.
    assert step(scheduler, runner).num_scheduled_tokens == {"b": 4}


def test_fork_shares_blocks_and_copies_only_the_partial_last_block():
    block_size = 4
    scheduler, runner = make_scheduler(16, block_size)
    kv = scheduler.kv_cache_manager
    parent = make_request("parent", list(range(1, 10)), max_tokens=4)  # 9 tokens
    scheduler.add_request(parent)
    step(scheduler, runner)  # prefill; samples token 10: 2 full blocks + a partial
    children = []
    for i in range(2):
        child = make_request(f"child{i}", parent.prompt_token_ids, max_tokens=4)
        child.append_output_token_ids(parent.output_token_ids)
        scheduler.fork_request(parent, child)
        children.append(child)
        assert kv.get_block_ids(child.request_id) == kv.get_block_ids("parent")
    parent_blocks = kv.get_block_ids("parent")
    assert [kv.block_pool.blocks[b].ref_cnt for b in parent_blocks] == [3, 3, 3]

    output = step(scheduler, runner)  # every sequence appends its divergent token
    # The first two writers copy the shared partial block; the last owns it alone.
    partial = parent_blocks[2]
    assert [src for src, _ in output.block_copies] == [partial, partial]
    for seq in [parent, *children]:
        assert kv.get_block_ids(seq.request_id)[:2] == parent_blocks[:2]
    run_until_done(scheduler, runner, 10)
    assert parent.output_token_ids == expected_output(parent, 2048)
    for child in children:
        # The child inherits the parent's first token, then samples its own.
        assert child.output_token_ids == expected_output(child, 2048, num_inherited=1)
    assert kv.num_free_blocks == 16


def test_preemption_lets_everything_finish_in_bounded_steps():
    block_size, num_blocks = 4, 12  # 48 slots; the requests need 8 x 28
    scheduler, runner = make_scheduler(num_blocks, block_size, prefix_caching=False)
    requests = [
        make_request(f"r{i}", [1 + i] * 20, max_tokens=8, arrival_time=float(i))
        for i in range(8)
    ]
    for request in requests:
        scheduler.add_request(request)
    num_steps = run_until_done(scheduler, runner, 8 * 28 * 2)
    assert scheduler.num_preemptions > 0
    for request in requests:
        assert request.output_token_ids == expected_output(request, 2048)
    assert scheduler.kv_cache_manager.num_free_blocks == num_blocks
    print(f"8 requests, pool of 48 slots: {num_steps} steps, "
          f"{scheduler.num_preemptions} preemptions")


def test_victim_is_lowest_priority_then_latest_arrival():
    scheduler, runner = make_scheduler(4, 4, prefix_caching=False)
    urgent = make_request("urgent", [1] * 4, max_tokens=4, arrival_time=2.0, priority=0)
    late = make_request("late", [2] * 4, max_tokens=4, arrival_time=1.0, priority=1)
    early = make_request("early", [3] * 4, max_tokens=4, arrival_time=0.0, priority=1)
    for request in (early, late, urgent):
        scheduler.add_request(request)
    preempted = []
    while scheduler.has_unfinished_requests():
        preempted += step(scheduler, runner).preempted_request_ids
    # At the first shortfall all three run: "urgent" arrived last but has the
    # highest priority, so the later of the two priority-1 requests goes.
    assert preempted == ["late"]
    assert late.num_preemptions == 1


def test_decodes_run_first_and_long_prompts_are_chunked():
    scheduler, runner = make_scheduler(64, 4, max_num_batched_tokens=8)
    short = make_request("short", [1, 2, 3], max_tokens=10)
    scheduler.add_request(short)
    step(scheduler, runner)
    long = make_request("long", list(range(1, 21)), max_tokens=1)
    scheduler.add_request(long)
    chunks = []
    while long.num_output_tokens == 0:
        output = step(scheduler, runner)
        assert output.num_scheduled_tokens["short"] == 1
        assert output.scheduled_requests[0] is short
        chunks.append(output.num_scheduled_tokens["long"])
    assert chunks == [7, 7, 6]


def test_abort_frees_blocks_and_is_reported_next_step():
    scheduler, runner = make_scheduler(8, 4)
    request = make_request("a", list(range(1, 10)), max_tokens=5)
    scheduler.add_request(request)
    step(scheduler, runner)
    scheduler.finish_requests(["a", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert request.finish_reason == "abort"
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    assert scheduler.schedule().finished_request_ids == ["a"]
    with pytest.raises(ValueError, match="status"):
        scheduler.finish_requests("a", RequestStatus.RUNNING)


def distinct_outputs(prompt_len, n):
    """A request id whose first n fake output tokens are distinct and not EOS."""
    for i in itertools.count():
        request_id = f"s{i}"
        tokens = [fake_token(request_id, prompt_len + k) for k in range(n)]
        if len(set(tokens)) == n and EOS not in tokens:
            return request_id, tokens


@pytest.mark.parametrize(
    "params, stop_at, eos_at, max_model_len, expected_len, status",
    [
        ({"max_tokens": 5}, None, None, 64, 5, RequestStatus.FINISHED_LENGTH),
        ({"max_tokens": None}, None, None, 8, 5, RequestStatus.FINISHED_LENGTH),
        ({"max_tokens": 9}, 2, None, 64, 3, RequestStatus.FINISHED_STOPPED),
        ({"max_tokens": 9, "min_tokens": 2}, 0, None, 64, 9, RequestStatus.FINISHED_LENGTH),
        ({"max_tokens": 9}, None, 1, 64, 2, RequestStatus.FINISHED_STOPPED),
        ({"max_tokens": 9, "min_tokens": 3}, None, 1, 64, 9, RequestStatus.FINISHED_LENGTH),
        ({"max_tokens": 9, "ignore_eos": True}, None, 1, 64, 9,
         RequestStatus.FINISHED_LENGTH),
    ],
)
def test_stop_conditions(params, stop_at, eos_at, max_model_len, expected_len, status):
    prompt = [1, 2, 3]
    request_id, tokens = distinct_outputs(len(prompt), 9)
    stop_token_ids = [] if stop_at is None else [tokens[stop_at]]
    eos = EOS if eos_at is None else tokens[eos_at]
    request = Request(request_id, prompt,
                      FakeSamplingParams(stop_token_ids=stop_token_ids, **params), eos)
    scheduler, runner = make_scheduler(16, 4, max_model_len=max_model_len)
    scheduler.add_request(request)
    run_until_done(scheduler, runner, 20)
    assert request.output_token_ids == tokens[:expected_len]
    assert request.status == status
    stopped_by_token = stop_at is not None and status == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == (tokens[stop_at] if stopped_by_token else None)


def test_waste_at_peak_under_a_random_workload_is_below_4_percent():
    rng = random.Random(0)
    block_size, num_blocks = 16, 4096
    kv = KVCacheManager(num_blocks, block_size)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192,
                                          max_model_len=1024), kv)
    runner = FakeRunner(kv, check_kv=False)
    requests = []
    for i in range(256):
        prompt = [rng.randrange(1, VOCAB_SIZE) for _ in range(rng.randint(64, 512))]
        requests.append(make_request(f"r{i}", prompt, max_tokens=rng.randint(1, 64),
                                     ignore_eos=True))
        scheduler.add_request(requests[-1])
    peak_usage, waste_at_peak = 0.0, 0.0
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        if kv.usage > peak_usage:
            peak_usage, waste_at_peak = kv.usage, kv.kv_waste()
        scheduler.update_from_output(output, runner.execute(output))
    print(f"KV waste at peak usage {peak_usage:.1%}: {waste_at_peak:.2%}")
    assert all(r.output_token_ids == expected_output(r, 1024) for r in requests)
    assert 0.0 < waste_at_peak < 0.04
