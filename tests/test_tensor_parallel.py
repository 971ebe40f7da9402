"""Tensor parallelism on CPUs (gloo, 2 processes) computes what one process computes,
and a tensor-parallel engine always ends its processes.

- Model level: every tiny architecture (tests/tiny_models.py), and a Llama
  whose vocabulary does not split evenly (padded), sharded over 2 ranks,
  gives the unsharded float32 logits through test_models' paged schedule
  (chunked prefill and decode over random block tables). The tiny models
  cover split kv heads (GQA 4/2) and replicated ones (MQA, kv heads < ranks).
  The fused forward of the GPU fast path (Triton kernels, here in the
  interpreter) on sharded Llama-family models gives the same logits.
- Step plans: a plan sent as tensors (engine.distributed.step_channel)
  arrives equal, whatever it holds.
- Engine level: `LLM(tensor_parallel_size=2)` (rank 0 here, rank 1 a spawned
  process) emits the same greedy tokens as `tensor_parallel_size=1` on the
  tiny Llama and Qwen2, with a roomy KV pool and with one so small that
  requests are preempted and recomputed. With the fast runner on both ranks
  (launched as torchrun would; decode steps padded as for CUDA graphs, which
  CPUs stand in for by running the padded inputs eagerly) the tokens are the
  same and both ranks pad every step alike.
- Exit: a TP=2 generation in a fresh interpreter ends, every process with
  it, within seconds: after `LLM.shutdown()`, after garbage collection, at
  interpreter exit without shutdown (also when multiprocessing's exit hook
  runs first), when rank 0 abandons a step midway, and when rank 0 is killed.
- Sizes that do not shard, and more ranks than devices or than torchrun
  started, are refused with a ValueError naming the field.
- On two GPUs (gpu-marked): the fast path (CUDA graphs holding the NCCL
  all-reduces) at TP=2 emits TP=1's greedy tokens, and the exits above hold
  with NCCL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig

import engine.engine_setup as engine_setup
import platforms
from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphs, capture_sizes
from engine.distributed.launcher import check_world_size, join_group
from engine.distributed.parallel_state import destroy_tp_group
from engine.distributed.step_channel import (HEADER_LEN, STOP_HANDSHAKE_TIMEOUT, decode_plan,
                                             encode_plan, payload_size)
from engine.gpu_model_runner import GpuModelRunner
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.models import check_tensor_parallel
from engine.step_inputs import StepArrays, StepPlan
from cpu_threads import single_torch_thread  # noqa: F401
from test_models import REFERENCE, random_sequences, run_schedule
from tiny_models import TINY_MODELS, tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

WORLD_SIZE = 2
FLOAT32_TOLERANCE = dict(atol=1e-4, rtol=1e-4)
CPU = platforms.get("cpu")


def _odd_vocab_llama(out_dir: Path) -> Path:
    config = LlamaConfig(vocab_size=397, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    return out_dir


def _schedule_logits(model_dir: Path, seed: int, fused: bool = False) -> list[torch.Tensor]:
    model, hf_config = load_model(str(model_dir), torch.float32, "cpu", REFERENCE)
    if fused:
        # Imported here: triton is needed only by the fused tests.
        from engine.models import fused
        from engine.models.fused_forward import FusedLlamaForward

        model.forward = FusedLlamaForward(model, hf_config.max_position_embeddings, fused)
    return run_schedule(model, random_sequences(hf_config.vocab_size, seed), seed)


def _sharded_rank(rank: int, store_port: int, model_dirs: dict[str, Path],
                  out_dir: Path, fused: bool = False) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", store_port, WORLD_SIZE, is_master=False)
    join_group(CPU, WORLD_SIZE, rank, rank, store)
    try:
        for seed, (name, model_dir) in enumerate(model_dirs.items()):
            torch.save(_schedule_logits(model_dir, seed, fused), out_dir / f"{name}-{rank}.pt")
    finally:
        destroy_tp_group()


def _run_sharded(model_dirs: dict[str, Path], out_dir: Path, fused: bool = False) -> None:
    store = dist.TCPStore("127.0.0.1", 0, WORLD_SIZE + 1, is_master=True,
                          wait_for_workers=False)
    mp.start_processes(_sharded_rank, args=(store.port, model_dirs, out_dir, fused),
                       nprocs=WORLD_SIZE, start_method="spawn")


def _assert_ranks_give(expected: list[torch.Tensor], out_dir: Path, name: str) -> None:
    for rank in range(WORLD_SIZE):
        got = torch.load(out_dir / f"{name}-{rank}.pt")
        for got_seq, want_seq in zip(got, expected, strict=True):
            torch.testing.assert_close(got_seq, want_seq, **FLOAT32_TOLERANCE,
                                       msg=lambda m: f"{name} rank {rank}: {m}")


@pytest.fixture(scope="module")
def model_dirs(tiny_model_factory, tmp_path_factory) -> dict[str, Path]:
    dirs = {name: tiny_model_factory(name) for name in TINY_MODELS}
    dirs["llama-odd-vocab"] = _odd_vocab_llama(tmp_path_factory.mktemp("odd-vocab"))
    return dirs


def test_sharded_models_equal_unsharded(model_dirs, tmp_path):
    _run_sharded(model_dirs, tmp_path)
    for seed, (name, model_dir) in enumerate(model_dirs.items()):
        _assert_ranks_give(_schedule_logits(model_dir, seed), tmp_path, name)


#: Llama-family models the fused forward covers: split kv heads, replicated kv heads
#: with q/k norms, and an unevenly split vocabulary
FUSED_MODELS = ["llama", "qwen3", "llama-odd-vocab"]


def test_sharded_fused_forward_equals_unsharded(model_dirs, tmp_path):
    fused_dirs = {name: model_dirs[name] for name in FUSED_MODELS}
    _run_sharded(fused_dirs, tmp_path, fused=True)
    for seed, (name, model_dir) in enumerate(fused_dirs.items()):
        _assert_ranks_give(_schedule_logits(model_dir, seed), tmp_path, name)


def _step_arrays(rng: np.random.Generator, num_new: list[int], width: int) -> StepArrays:
    num_seqs = len(num_new)
    return StepArrays(
        token_ids=rng.integers(0, 1000, sum(num_new)),
        num_computed=rng.integers(0, 50, num_seqs),
        num_new=np.array(num_new, np.int64),
        block_tables=rng.integers(0, 300, (num_seqs, width)).astype(np.int32),
        samples=rng.random(num_seqs) < 0.7)


def _plans() -> dict[str, StepPlan]:
    rng = np.random.default_rng(7)
    decode = _step_arrays(rng, [1] * 9, 5)
    prefill = _step_arrays(rng, [13, 1, 40], 4)
    return {
        "block copies only": StepPlan([(3, 8), (5, 1)]),
        "empty": StepPlan([]),
        "decode": StepPlan([], decode, [decode.sampling_rows()]),
        "copies, prompt logprobs and sampling": StepPlan(
            [(2, 9)], prefill, [np.array([0, 1, 2, 14], np.int64), prefill.sampling_rows()]),
        "forward without logits": StepPlan([], _step_arrays(rng, [6, 2], 1)),
        "multi-step decode": StepPlan([], _multi_step(decode), [decode.sampling_rows()]),
    }


def _multi_step(arrays: StepArrays) -> StepArrays:
    return dataclasses.replace(arrays, decode_steps=np.arange(len(arrays.num_new)) % 4 + 1)


@pytest.mark.parametrize("name", list(_plans()))
def test_plan_survives_its_tensors(name):
    plan = _plans()[name]
    header, payload = encode_plan(plan)
    assert header.shape == (HEADER_LEN,) and header.dtype == payload.dtype == np.int64
    assert payload_size(header) == payload.shape[0]
    got = decode_plan(header.copy(), payload.copy())
    assert got.block_copies == plan.block_copies
    assert len(got.logits_rows) == len(plan.logits_rows)
    for got_rows, want_rows in zip(got.logits_rows, plan.logits_rows):
        np.testing.assert_array_equal(got_rows, want_rows)
    if plan.arrays is None:
        assert got.arrays is None
        return
    for field in ("token_ids", "num_computed", "num_new", "block_tables", "samples"):
        want, have = getattr(plan.arrays, field), getattr(got.arrays, field)
        assert have.dtype == want.dtype, field
        np.testing.assert_array_equal(have, want, err_msg=field)
    if plan.arrays.decode_steps is None:
        assert got.arrays.decode_steps is None
    else:
        np.testing.assert_array_equal(got.arrays.decode_steps, plan.arrays.decode_steps)


def test_plans_workers_cannot_run_are_refused():
    with pytest.raises(ValueError, match="logits_rows: at most 2 lists"):
        encode_plan(StepPlan([], None, [np.arange(2)] * 3))


#: KV pool -> LLM keyword arguments (8 blocks of 16 tokens cannot hold the batch at once)
KV_POOLS = {"roomy": dict(), "preempting": dict(num_gpu_blocks_override=8)}


def _prompts_and_params(vocab_size: int) -> tuple[list[dict], list[SamplingParams]]:
    """10 prompts of 8..47 tokens, emitting 8..26 tokens each (at most 5 blocks per request)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 48, (10,), generator=generator).tolist()
    prompts = [{"prompt_token_ids": torch.randint(4, vocab_size, (n,),
                                                  generator=generator).tolist()}
               for n in lengths]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 2 * i, ignore_eos=True)
              for i in range(len(prompts))]
    return prompts, params


@pytest.mark.parametrize("pool", list(KV_POOLS))
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_tokens_equal_unsharded(tiny_model_factory, name, pool):
    model_dir = str(tiny_model_factory(name))
    runs = {}
    for size in (1, WORLD_SIZE):
        llm = LLM(model_dir, device="cpu", dtype="float32", tensor_parallel_size=size,
                  **KV_POOLS[pool])
        prompts, params = _prompts_and_params(llm.llm_engine.vocab_size)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs[size] = ([o.outputs[0].token_ids for o in outputs],
                      llm.llm_engine.num_preemptions)
        llm.shutdown()
    assert runs[WORLD_SIZE][0] == runs[1][0]
    assert [len(t) for t in runs[WORLD_SIZE][0]] == [p.max_tokens for p in params]
    if pool == "preempting":
        assert runs[WORLD_SIZE][1] > 0


def test_multi_step_decode_equals_unsharded(tiny_model_factory, monkeypatch):
    """Rank 0 schedules runs of 4 decode steps; the workers run each whole (the logits are
    whole on every rank, so every rank feeds the same argmax to the next step)."""
    model_dir = str(tiny_model_factory("llama"))
    llm = LLM(model_dir, device="cpu", dtype="float32")
    prompts, params = _prompts_and_params(llm.llm_engine.vocab_size)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(ModelRunner, "max_decode_steps", 4)
    llm = LLM(model_dir, device="cpu", dtype="float32", tensor_parallel_size=WORLD_SIZE)
    scheduler = llm.llm_engine.scheduler
    schedule, decode_steps = scheduler.schedule, []
    monkeypatch.setattr(scheduler, "schedule",
                        lambda: decode_steps.append((out := schedule()).decode_steps) or out)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.shutdown()
    assert got == want
    assert max(decode_steps) == 4


#: the fast-runner engines: few sequences, so decode steps pad to a captured size
FAST_ENGINE = dict(dtype="float32", max_num_seqs=8, max_model_len=64)
#: (num_tokens, padded size) of every padded decode step this process ran
PADDED_STEPS: list[tuple[int, int]] = []


class _EagerDecodeGraphs(DecodeGraphs):
    """DecodeGraphs' choices where nothing can be captured: a "replay" runs the forward
    pass on the padded inputs staged at the graphs' addresses (logged in PADDED_STEPS)."""

    def __init__(self, runner: GpuModelRunner):
        super().__init__(runner.forward, runner.buffers,
                         capture_sizes(runner.config.max_num_seqs))
        stage = runner.buffers.stage

        def stage_and_keep(inputs, pad_to=None):
            self.staged = stage(inputs, pad_to=pad_to)
            if pad_to is not None:
                PADDED_STEPS.append((inputs.input_ids.shape[0], pad_to))
            return self.staged

        runner.buffers.stage = stage_and_keep

    def replay(self, size: int) -> torch.Tensor:
        assert self.staged.input_ids.shape[0] == size
        return self.forward(self.staged)


class _CpuFastRunner(GpuModelRunner):
    def initialize_kv_cache(self) -> int:
        num_blocks = super().initialize_kv_cache()
        self.graphs = _EagerDecodeGraphs(self)
        return num_blocks


def _fast_prompts() -> tuple[list[dict], list[SamplingParams]]:
    """6 prompts of 3..20 tokens emitting 2..12 tokens: decode batches of 6 down to 1."""
    generator = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(4, 390, (n,), generator=generator).tolist()}
               for n in (3, 20, 9, 14, 5, 11)]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + 2 * i, ignore_eos=True)
              for i in range(len(prompts))]
    return prompts, params


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_rank(rank: int, port: int, model_dir: str, out_dir: Path) -> None:
    """One rank of a TP=2 engine launched as torchrun launches it, fast runner on CPU."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    engine_setup.make_model_runner = _CpuFastRunner
    tokens = None
    try:
        llm = LLM(model_dir, device="cpu", tensor_parallel_size=WORLD_SIZE, **FAST_ENGINE)
    except SystemExit:  # rank 1: it served rank 0 until stopped
        pass
    else:
        assert isinstance(llm.llm_engine.model_runner, _CpuFastRunner)
        outputs = llm.generate(*_fast_prompts(), use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outputs]
        llm.shutdown()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"tokens": tokens, "padded_steps": PADDED_STEPS}))


def test_fast_runner_on_every_rank_equals_unsharded(tiny_model_factory, tmp_path):
    model_dir = str(tiny_model_factory("llama"))
    plain = LLM(model_dir, device="cpu", **FAST_ENGINE)
    want = [o.outputs[0].token_ids for o in plain.generate(*_fast_prompts(), use_tqdm=False)]
    mp.start_processes(_torchrun_rank, args=(_free_port(), model_dir, tmp_path),
                       nprocs=WORLD_SIZE, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text())
             for rank in range(WORLD_SIZE)]
    assert ranks[0]["tokens"] == want
    assert ranks[1]["padded_steps"] == ranks[0]["padded_steps"]
    assert any(num_tokens < size for num_tokens, size in ranks[0]["padded_steps"])


#: a TP=2 generation, then an end of the interpreter's life; prints its workers' pids
_EXIT_SCRIPT = """
{prelude}
import multiprocessing, os, signal, sys, time
import numpy as np
from engine import LLM, SamplingParams
from engine.distributed.step_channel import send_step
from engine.step_inputs import StepArrays, StepPlan

def main():
    global llm
    llm = LLM({model_dir!r}, device={device!r}, dtype="float32", tensor_parallel_size=2,
              max_num_seqs=8, max_model_len=64)
    print("workers", *[p.pid for p in multiprocessing.active_children()], flush=True)
    llm.generate([{{"prompt_token_ids": [5, 6, 7]}}],
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
{ending}    print("ending", time.time(), flush=True)

main()
"""
#: how each run ends, after its generation (lines of main's body)
_EXIT_ENDINGS = {
    "shutdown": ["llm.shutdown()"],
    "garbage-collected": ["del llm", "import gc", "gc.collect()",
                          "assert not multiprocessing.active_children()"],
    "interpreter-exit": [],
    # A finalizer made before torch is imported runs after multiprocessing's exit hook.
    "interpreter-exit, multiprocessing's hook first": [],
    # Rank 0 sends a decode step of one sequence, then never runs it.
    "step abandoned": ["send_step(StepPlan([], StepArrays(np.array([9]), np.array([0]), "
                       "np.array([1]), np.zeros((1, 1), np.int32), np.array([True])), "
                       "[np.array([0])]))",
                       "llm.shutdown()"],
    "rank 0 killed": ["print('ending', time.time(), flush=True)",
                      "os.kill(os.getpid(), signal.SIGKILL)"],
}
_EARLY_FINALIZER = ("import weakref\n"
                    "weakref.finalize(type('Anchor', (), {})(), print, 'early finalizer')")
#: an exit's limit beyond the stop handshake's timeout (the abandoned step waits it out)
EXIT_SECONDS = 15
_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")])]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("ending", list(_EXIT_ENDINGS))
def test_every_process_ends_within_seconds(tiny_model_factory, device, ending):
    script = _EXIT_SCRIPT.format(
        prelude=_EARLY_FINALIZER if "hook first" in ending else "",
        model_dir=str(tiny_model_factory("llama")), device=device,
        ending="".join(f"    {line}\n" for line in _EXIT_ENDINGS[ending]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=300)
    ended = time.time()
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert "ending" in lines, proc.stdout + proc.stderr
    limit = EXIT_SECONDS + (STOP_HANDSHAKE_TIMEOUT.total_seconds()
                            if ending == "step abandoned" else 0)
    assert ended - float(lines["ending"]) < limit
    workers = [int(pid) for pid in lines["workers"].split()]
    assert len(workers) == WORLD_SIZE - 1
    deadline = time.monotonic() + EXIT_SECONDS
    while not all(map(_gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(map(_gone, workers))
    if ending == "rank 0 killed":
        assert proc.returncode == -9
        return
    assert proc.returncode == 0, proc.stderr
    if ending == "step abandoned":
        assert "did not answer the stop, killing them" in proc.stderr, proc.stderr
    else:  # no worker killed, terminated, failed or unreachable
        assert "tensor-parallel worker" not in proc.stderr, proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fast_path_on_two_gpus_equals_one(tiny_model_factory):
    model_dir = str(tiny_model_factory("llama"))
    runs = {}
    for size, eager in ((1, True), (WORLD_SIZE, False)):
        llm = LLM(model_dir, device="cuda", tensor_parallel_size=size, enforce_eager=eager,
                  **FAST_ENGINE)
        if not eager:
            runner = llm.llm_engine.model_runner
            assert isinstance(runner, GpuModelRunner) and runner.graphs is not None
        outputs = llm.generate(*_fast_prompts(), use_tqdm=False)
        runs[size] = [o.outputs[0].token_ids for o in outputs]
        llm.shutdown()
    assert runs[WORLD_SIZE] == runs[1]


def test_more_ranks_than_devices_are_refused():
    # This machine's torch sees no CUDA device.
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 cuda devices"):
        check_world_size(platforms.get("cuda"), 2)


def test_size_must_match_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 differs from torchrun"):
        check_world_size(CPU, 2)


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_size_must_be_a_positive_int(tiny_model_factory, size):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        LLM(str(tiny_model_factory("llama")), device="cpu", tensor_parallel_size=size)


def test_engine_refuses_unshardable_model_before_starting_workers(tiny_model_factory):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide "
                                         "num_attention_heads=4"):
        LLM(str(tiny_model_factory("llama")), device="cpu", tensor_parallel_size=3)


def _llama_config(**overrides) -> LlamaConfig:
    fields = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=100,
                  architectures=["LlamaForCausalLM"])
    return LlamaConfig(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, size, field", [
    (dict(), 4, "num_attention_heads"),
    (dict(), 3, "num_key_value_heads"),
    (dict(num_key_value_heads=3), 2, "num_key_value_heads"),
    (dict(intermediate_size=101), 2, "intermediate_size"),
])
def test_unshardable_sizes_are_refused(overrides, size, field):
    with pytest.raises(ValueError, match=f"tensor_parallel_size={size} must divide {field}"):
        check_tensor_parallel(_llama_config(**overrides), size, REFERENCE)


@pytest.mark.parametrize("size", [1, 2, 6])
def test_kv_heads_split_or_replicate(size):
    """6 heads over 2 kv heads: 2 ranks split them, 6 ranks replicate each thrice."""
    check_tensor_parallel(_llama_config(), size, REFERENCE)
