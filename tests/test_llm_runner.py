"""The model runner's pieces: packed step inputs, KV pool sizing, block copies.

`prepare_step_inputs` is vectorized over tokens; here it is checked against a
plain per-token construction on random schedules (random computed prefixes,
chunk lengths and scattered block tables).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.request import Request
from engine.step_inputs import dummy_step_inputs, prepare_step_inputs
from cpu_threads import single_torch_thread  # noqa: F401
from tiny_models import tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@dataclass
class FakeSchedulerOutput:
    scheduled_requests: list
    num_scheduled_tokens: dict
    block_copies: list
    decode_steps: int = 1


def random_step(rng: random.Random, block_size: int, num_requests: int):
    """Requests with output tokens and computed prefixes, chunks up to the end or not."""
    requests, num_new, tables = [], {}, {}
    free_blocks = list(range(200))
    rng.shuffle(free_blocks)
    for i in range(num_requests):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
        request = Request(f"r{i}", prompt, SamplingParams(max_tokens=50))
        request.append_output_token_ids([rng.randrange(1000) for _ in range(rng.randint(0, 5))])
        request.num_computed_tokens = rng.randint(0, request.num_tokens - 1)
        remaining = request.num_tokens - request.num_computed_tokens
        num_new[request.request_id] = rng.choice([remaining, rng.randint(1, remaining)])
        needed = -(-(request.num_computed_tokens + num_new[request.request_id]) // block_size)
        tables[request.request_id] = [free_blocks.pop() for _ in range(needed)]
        requests.append(request)
    return FakeSchedulerOutput(requests, num_new, []), tables


def per_token_reference(step, tables, block_size):
    input_ids, positions, slots, seq_lens, logits_rows, samplers = [], [], [], [], [], []
    starts = [0]
    for request in step.scheduled_requests:
        start, n = request.num_computed_tokens, step.num_scheduled_tokens[request.request_id]
        for pos in range(start, start + n):
            input_ids.append(request.all_token_ids[pos])
            positions.append(pos)
            table = tables[request.request_id]
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(start + n)
        starts.append(starts[-1] + n)
        if start + n == request.num_tokens:
            logits_rows.append(starts[-1] - 1)
            samplers.append(request.request_id)
    return input_ids, positions, slots, seq_lens, starts, logits_rows, samplers


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_step_inputs_match_per_token_construction(seed, block_size):
    rng = random.Random(seed * 100 + block_size)
    step, tables = random_step(rng, block_size, num_requests=rng.randint(1, 8))
    inputs = prepare_step_inputs(step, tables.__getitem__, block_size, torch.device("cpu"))
    ids, positions, slots, seq_lens, starts, rows, samplers = \
        per_token_reference(step, tables, block_size)
    attn = inputs.attn
    assert inputs.input_ids.tolist() == ids and inputs.input_ids.dtype == torch.int64
    assert inputs.positions.tolist() == positions
    assert attn.slot_mapping.tolist() == slots and attn.slot_mapping.dtype == torch.int64
    assert attn.seq_lens.tolist() == seq_lens and attn.seq_lens.dtype == torch.int32
    assert attn.query_start_loc.tolist() == starts
    assert attn.query_start_loc.dtype == torch.int32 and attn.block_tables.dtype == torch.int32
    for row, request in zip(attn.block_tables.tolist(), step.scheduled_requests):
        table = tables[request.request_id]
        assert row[:len(table)] == table
    assert attn.max_seq_len == max(seq_lens)
    assert attn.max_query_len == max(b - a for a, b in zip(starts, starts[1:]))
    assert inputs.logits_indices.tolist() == rows
    assert [r.request_id for r in inputs.sampling_requests] == samplers


@pytest.mark.parametrize("max_num_batched_tokens, max_num_seqs, max_model_len",
                         [(64, 256, 2048), (100, 7, 2048), (8192, 16, 256), (300, 2, 100)])
def test_profiling_step_is_the_largest_batch(max_num_batched_tokens, max_num_seqs,
                                             max_model_len):
    config = EngineConfig(block_size=16, max_num_batched_tokens=max_num_batched_tokens,
                          max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    inputs = dummy_step_inputs(config, torch.device("cpu"))
    assert inputs.input_ids.shape[0] == min(max_num_batched_tokens, max_num_seqs * max_model_len)
    assert inputs.attn.num_seqs == min(max_num_seqs, max_num_batched_tokens)
    # No sequence is longer than the model allows (positions index its embeddings).
    assert int(inputs.attn.seq_lens.max()) <= max_model_len
    assert int(inputs.positions.max()) < max_model_len
    assert inputs.logits_indices.shape[0] == inputs.attn.num_seqs
    slots = inputs.attn.slot_mapping
    assert slots.unique().numel() == slots.numel()  # no two tokens share a KV slot
    assert int(slots.max()) < inputs.num_blocks_needed * config.block_size


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return str(tiny_model_factory("qwen2"))


def test_kv_pool_is_clipped_to_what_the_sequences_need(model_dir):
    llm = LLM(model=model_dir, device="cpu", max_model_len=64, max_num_seqs=4,
              block_size=8)
    assert llm.llm_engine.model_runner.num_blocks == 4 * (64 // 8)


def test_kv_pool_from_kv_cache_memory_and_override(model_dir):
    runner = LLM(model=model_dir, device="cpu", dtype="float32",
                 max_model_len=64).llm_engine.model_runner
    block_bytes = runner.block_bytes()
    key_cache, _ = runner.kv_caches[0]
    assert block_bytes == 2 * len(runner.kv_caches) * key_cache[0].numel() * 4  # float32
    llm = LLM(model=model_dir, device="cpu", dtype="float32", max_model_len=64,
              kv_cache_memory=10 * block_bytes + 1)
    assert llm.llm_engine.model_runner.num_blocks == 10
    assert llm.llm_engine.kv_cache_manager.num_free_blocks == 10
    llm = LLM(model=model_dir, device="cpu", dtype="float32", max_model_len=64,
              num_gpu_blocks_override=7, kv_cache_memory=10 * block_bytes)
    assert llm.llm_engine.model_runner.kv_caches[0][0].shape[0] == 7
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(model=model_dir, device="cpu", dtype="float32", max_model_len=64,
            kv_cache_memory=block_bytes)


@pytest.mark.parametrize("field, value", [
    ("block_size", 0), ("max_num_seqs", -1), ("max_model_len", 0), ("dtype", "int8"),
    ("gpu_memory_utilization", 1.5), ("num_gpu_blocks_override", 1), ("kv_cache_memory", 0),
])
def test_bad_engine_config(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_max_model_len_beyond_the_model(model_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=model_dir, device="cpu", max_model_len=10**6)


def test_block_copies_cover_every_layer_k_and_v(model_dir):
    runner = LLM(model=model_dir, device="cpu", max_model_len=64).llm_engine.model_runner
    for key_cache, value_cache in runner.kv_caches:
        key_cache.normal_()
        value_cache.normal_()
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    runner.copy_blocks([(3, 5), (9, 2)])
    for (key_cache, value_cache), (key_before, value_before) in zip(runner.kv_caches, before):
        for cache, old in ((key_cache, key_before), (value_cache, value_before)):
            assert torch.equal(cache[5], old[3]) and torch.equal(cache[2], old[9])
            untouched = [b for b in range(cache.shape[0]) if b not in (5, 2)]
            assert torch.equal(cache[untouched], old[untouched])


def test_gpu_sizing_subtracts_others_and_the_activation_peak(model_dir, monkeypatch):
    """The accelerator path, run on CPU with a fake memory allocator and device.

    The profiling forward really runs (a full max_num_batched_tokens step and
    the sampler); only the memory numbers it reads are made up.
    """
    runner = LLM(model=model_dir, device="cpu", max_model_len=64,
                 max_num_batched_tokens=96).llm_engine.model_runner
    gib = 2**30
    peaks = {}

    class FakeAccelerator:
        synchronize = reset_peak_memory_stats = empty_cache = staticmethod(lambda: None)
        memory_allocated = staticmethod(lambda: 3 * gib)

        @staticmethod
        def max_memory_allocated():
            return 3 * gib + peaks["cache_bytes"] + gib // 2

    real_allocate = runner._allocate

    def allocate(num_blocks):
        peaks["cache_bytes"] = num_blocks * runner.block_bytes()
        return real_allocate(num_blocks)

    monkeypatch.setattr(torch, "cpu", FakeAccelerator)
    monkeypatch.setattr(runner, "_allocate", allocate)
    monkeypatch.setattr(runner.platform, "memory_info", lambda: (80 * gib, 70 * gib))
    runner.config.gpu_memory_utilization = 0.5
    # 40 GiB allowed - 10 GiB in use (weights, other processes) - 0.5 GiB activations
    assert runner._kv_budget_from_profile() == int(29.5 * gib)
    assert peaks["cache_bytes"] > 0


def test_plain_greedy_rows_skip_the_sampler_and_get_its_tokens(model_dir, monkeypatch):
    """Plain greedy steps are one argmax; the tokens equal the sampler's greedy ones
    (logprobs=0 keeps a request on the sampler without changing what it picks)."""
    llm = LLM(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64)
    generator = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(4, 390, (n,), generator=generator).tolist()}
               for n in (2, 9, 30)]
    sampler_calls = []
    sampler = llm.llm_engine.model_runner.sampler
    monkeypatch.setattr(llm.llm_engine.model_runner, "sampler",
                        lambda *args: sampler_calls.append(1) or sampler(*args))

    def greedy_tokens(**extra) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, **extra)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    argmax_tokens = greedy_tokens()
    assert not sampler_calls
    assert greedy_tokens(logprobs=0) == argmax_tokens
    assert sampler_calls
