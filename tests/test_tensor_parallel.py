"""Tensor parallelism on CPUs (gloo, 2 processes) computes what one process computes.

- Model level: every tiny architecture (tests/tiny_models.py), and a Llama
  whose vocabulary does not split evenly (padded), sharded over 2 ranks,
  gives the unsharded float32 logits through test_models' paged schedule
  (chunked prefill and decode over random block tables). The tiny models
  cover split kv heads (GQA 4/2) and replicated ones (MQA, kv heads < ranks).
- Engine level: `LLM(tensor_parallel_size=2)` (rank 0 here, rank 1 a spawned
  process) emits the same greedy tokens as `tensor_parallel_size=1` on the
  tiny Llama and Qwen2, with a roomy KV pool and with one so small that
  requests are preempted and recomputed.
- Sizes that do not shard, and more ranks than devices or than torchrun
  started, are refused with a ValueError naming the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig

import platforms
from engine import LLM, SamplingParams
from engine.distributed.launcher import check_world_size, join_group
from engine.distributed.parallel_state import destroy_tp_group
from engine.model_loader import load_model
from engine.models import check_tensor_parallel
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


def _schedule_logits(model_dir: Path, seed: int) -> list[torch.Tensor]:
    model, hf_config = load_model(str(model_dir), torch.float32, "cpu", REFERENCE)
    return run_schedule(model, random_sequences(hf_config.vocab_size, seed), seed)


def _sharded_rank(rank: int, store_port: int, model_dirs: dict[str, Path],
                  out_dir: Path) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", store_port, WORLD_SIZE, is_master=False)
    join_group(CPU, WORLD_SIZE, rank, rank, store)
    try:
        for seed, (name, model_dir) in enumerate(model_dirs.items()):
            torch.save(_schedule_logits(model_dir, seed), out_dir / f"{name}-{rank}.pt")
    finally:
        destroy_tp_group()


@pytest.fixture(scope="module")
def model_dirs(tiny_model_factory, tmp_path_factory) -> dict[str, Path]:
    dirs = {name: tiny_model_factory(name) for name in TINY_MODELS}
    dirs["llama-odd-vocab"] = _odd_vocab_llama(tmp_path_factory.mktemp("odd-vocab"))
    return dirs


def test_sharded_models_equal_unsharded(model_dirs, tmp_path):
    store = dist.TCPStore("127.0.0.1", 0, WORLD_SIZE + 1, is_master=True,
                          wait_for_workers=False)
    mp.start_processes(_sharded_rank, args=(store.port, model_dirs, tmp_path),
                       nprocs=WORLD_SIZE, start_method="spawn")
    for seed, (name, model_dir) in enumerate(model_dirs.items()):
        expected = _schedule_logits(model_dir, seed)
        for rank in range(WORLD_SIZE):
            got = torch.load(tmp_path / f"{name}-{rank}.pt")
            for got_seq, want_seq in zip(got, expected, strict=True):
                torch.testing.assert_close(got_seq, want_seq, **FLOAT32_TOLERANCE,
                                           msg=lambda m: f"{name} rank {rank}: {m}")


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
