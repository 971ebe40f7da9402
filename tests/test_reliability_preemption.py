"""Preemption soak: many concurrent requests through a KV pool far too small for them.

Every request is submitted at once to an AsyncLLMEngine (the server's engine)
whose pool holds a few requests at a time, so the scheduler preempts by
recompute over and over. Each request must finish exactly once, its streamed
outputs must only ever grow (a preempted request never loses or repeats a
token), its greedy tokens must equal those of an unconstrained offline run, and
every KV block must be free at the end. Recompute attends over the same
tokens in another kernel (prefill, not decode), so a greedy pick whose top two
logits tie to float32 rounding may flip: a request may then part from the
offline run there, and only there (`assert_same_greedy_tokens`). The number of preemptions is printed
(run with -s) and must be large. float32: in bfloat16 (the CPU default where
the CPU has it) logits tie often and greedy picks depend on the batch.
"""

import asyncio
import random
from typing import Optional

import pytest
from cpu_threads import single_torch_thread  # noqa: F401  (fixture)
from server_harness import start_engine, wait_idle
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)

from engine import LLM, SamplingParams
from engine.async_engine import AsyncLLMEngine

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_MODEL_LEN = 128
BLOCK_SIZE = 16
SMALL_POOL = 12  # blocks: a handful of requests; the longest needs 5
MAX_NUM_SEQS = 64


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):  # noqa: F811
    return tiny_model_factory("llama")


def random_requests(num_requests: int, vocab_size: int, seed: int):
    """(prompt token ids, max_tokens) pairs: 4-32 prompt tokens, 4-40 output tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(4, vocab_size) for _ in range(rng.randint(4, 32))],
             rng.randint(4, 40)) for _ in range(num_requests)]


#: top-2 logprob gap under which two greedy candidates count as tied in float32
TIE = 1e-4


def greedy(max_tokens: int, logprobs: Optional[int] = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=logprobs)


def assert_same_greedy_tokens(tokens: list[int], reference, what: str) -> None:
    """`tokens` equal the reference `CompletionOutput`'s, or part from them first at a
    position where the reference's top two candidates tie and `tokens` took the other."""
    expected = list(reference.token_ids)
    if tokens == expected:
        return
    j = next((j for j, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
    assert j is not None, f"{what}: {len(tokens)} tokens, the offline run {len(expected)}"
    top = reference.logprobs[j]
    assert tokens[j] in top, f"{what}: token {j} is {tokens[j]}, not a top-2 candidate"
    gap = abs(top[tokens[j]].logprob - top[expected[j]].logprob)
    assert gap < TIE, f"{what}: token {j} differs though the top two are {gap:.2e} apart"


async def soak(engine: AsyncLLMEngine, requests) -> dict[str, list[tuple[list[int], bool]]]:
    """Submit every request at once -> request id -> (token ids, finished) of each output."""
    seen: dict[str, list[tuple[list[int], bool]]] = {}

    async def one(i: int, prompt_token_ids: list[int], max_tokens: int) -> None:
        async for output in engine.generate({"prompt_token_ids": prompt_token_ids},
                                            greedy(max_tokens), f"soak-{i}"):
            seen.setdefault(output.request_id, []).append(
                (list(output.outputs[0].token_ids), output.finished))

    await asyncio.gather(*(one(i, prompt, max_tokens)
                           for i, (prompt, max_tokens) in enumerate(requests)))
    return seen


@pytest.mark.parametrize("num_requests", [120, pytest.param(500, marks=pytest.mark.slow)])
def test_every_request_survives_repeated_preemption_exactly_once(model_dir, num_requests):
    seed = random.randrange(2**32)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
              max_num_seqs=MAX_NUM_SEQS)
    requests = random_requests(num_requests, llm.llm_engine.vocab_size, seed)
    reference = [o.outputs[0] for o in llm.generate(
        [{"prompt_token_ids": p} for p, _ in requests],
        [greedy(max_tokens, logprobs=2) for _, max_tokens in requests], use_tqdm=False)]
    assert llm.llm_engine.num_preemptions == 0
    engine = start_engine(model_dir, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                          max_num_seqs=MAX_NUM_SEQS, num_gpu_blocks_override=SMALL_POOL)
    try:
        seen = asyncio.run(soak(engine, requests))
        wait_idle(engine)
        num_preemptions = engine.engine.num_preemptions
    finally:
        engine.shutdown()
    print(f"\npreemption soak (seed {seed}): {num_requests} requests, "
          f"{num_preemptions} preemptions")
    assert sorted(seen) == sorted(f"soak-{i}" for i in range(num_requests))
    for i, (_, max_tokens) in enumerate(requests):
        outputs = seen[f"soak-{i}"]
        assert [finished for _, finished in outputs].count(True) == 1, f"seed {seed}"
        assert outputs[-1][1], f"soak-{i} did not end with its finished output (seed {seed})"
        for (before, _), (after, _) in zip(outputs, outputs[1:]):
            assert after[:len(before)] == before and len(after) > len(before), \
                f"soak-{i}: a streamed output lost or repeated tokens (seed {seed})"
        assert_same_greedy_tokens(outputs[-1][0], reference[i], f"soak-{i} (seed {seed})")
        assert len(outputs[-1][0]) == max_tokens
    assert num_preemptions >= num_requests // 4
