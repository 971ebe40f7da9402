"""A fake model runner for scheduler tests: fixed tokens, a simulated KV cache.

`fake_token(request_id, position)` is the token "sampled" for `position`; it
depends only on the request and the position, so recomputation after preemption
must reproduce the same output. `FakeRunner` keeps a dict slot -> token id as its
KV cache, performs block copies, and on every step checks that each scheduled
request reads back exactly its own tokens from its block table, and writes only
slots no other live request can see.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.scheduler import Scheduler, SchedulerOutput

VOCAB_SIZE = 64


@dataclass
class FakeSamplingParams:
    max_tokens: int | None = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0


def fake_token(request_id: str, position: int) -> int:
    return zlib.crc32(f"{request_id}@{position}".encode()) % VOCAB_SIZE


def expected_output(
    request: Request, max_model_len: int, num_inherited: int = 0
) -> list[int]:
    """The output a request must end with, from its own stop rules.

    The first `num_inherited` output tokens are taken as given (a forked child
    inherits its parent's output so far).
    """
    params = request.sampling_params
    num_prompt = request.num_prompt_tokens
    output = request.output_token_ids[:num_inherited]
    while True:
        token_id = fake_token(request.request_id, num_prompt + len(output))
        output.append(token_id)
        if len(output) >= params.min_tokens and (
            (token_id == request.eos_token_id and not params.ignore_eos)
            or token_id in (params.stop_token_ids or ())
        ):
            return output
        if params.max_tokens is not None and len(output) >= params.max_tokens:
            return output
        if num_prompt + len(output) >= max_model_len:
            return output


class FakeRunner:
    """Executes `SchedulerOutput`s against a simulated KV cache (slot -> token id)."""

    def __init__(self, kv_cache_manager: KVCacheManager, check_kv: bool = True) -> None:
        self.kv = kv_cache_manager
        self.check_kv = check_kv
        self.kv_cache: dict[int, int] = {}

    def execute(self, output: SchedulerOutput) -> dict[str, list[int]]:
        if self.check_kv:
            self._copy_blocks(output.block_copies)
        written: set[int] = set()
        sampled = {}
        for request in output.scheduled_requests:
            num_new = output.num_scheduled_tokens[request.request_id]
            start = request.num_computed_tokens
            assert num_new > 0 and start + num_new <= request.num_tokens
            if self.check_kv:
                self._check_and_write(request, start, num_new, written)
            if start + num_new == request.num_tokens:
                sampled[request.request_id] = [
                    fake_token(request.request_id, request.num_tokens)
                ]
        return sampled

    def _copy_blocks(self, block_copies: list[tuple[int, int]]) -> None:
        block_size = self.kv.block_size
        for src, dst in block_copies:
            for offset in range(block_size):
                token_id = self.kv_cache.get(src * block_size + offset)
                if token_id is None:
                    self.kv_cache.pop(dst * block_size + offset, None)
                else:
                    self.kv_cache[dst * block_size + offset] = token_id

    def _check_and_write(
        self, request: Request, start: int, num_new: int, written: set[int]
    ) -> None:
        block_size = self.kv.block_size
        block_ids = self.kv.get_block_ids(request.request_id)
        blocks = self.kv.block_pool.blocks
        assert len(block_ids) * block_size >= start + num_new, "table too short"
        token_ids = request.all_token_ids
        for position in range(start + num_new):
            block_id = block_ids[position // block_size]
            slot = block_id * block_size + position % block_size
            if position < start:
                assert self.kv_cache.get(slot) == token_ids[position], (
                    f"{request.request_id} reads a wrong KV at position {position}"
                )
                continue
            assert slot not in written, f"slot {slot} written twice in one step"
            assert blocks[block_id].ref_cnt == 1, f"write into shared block {block_id}"
            assert blocks[block_id].block_hash is None, "write into a cached block"
            written.add(slot)
            self.kv_cache[slot] = token_ids[position]


def check_block_accounting(scheduler: Scheduler) -> None:
    """Every block's ref_cnt equals the number of live block tables holding it."""
    kv = scheduler.kv_cache_manager
    owners = [0] * kv.num_blocks
    for request_id in scheduler.requests:
        for block_id in kv.get_block_ids(request_id):
            owners[block_id] += 1
    assert [block.ref_cnt for block in kv.block_pool.blocks] == owners
    assert kv.num_free_blocks == owners.count(0)


def step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    """One schedule + execute + update round; returns the schedule."""
    output = scheduler.schedule()
    config = scheduler.config
    assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
    assert len(output.scheduled_requests) <= config.max_num_seqs
    assert len({r.request_id for r in output.scheduled_requests}) == len(
        output.scheduled_requests
    )
    sampled = runner.execute(output)
    scheduler.update_from_output(output, sampled)
    return output
