"""Tensor parallelism on CPUs (gloo, 2 processes) computes what one process computes.

- Model level: every tiny architecture (tests/tiny_models.py), and a Llama
  whose vocabulary does not split evenly (padded), sharded over 2 ranks,
  gives the unsharded float32 logits through test_models' paged schedule
  (chunked prefill and decode over random block tables). The tiny models
  cover split kv heads (GQA 4/2) and replicated ones (MQA, kv heads < ranks).
- Sizes that do not shard are refused with a ValueError naming the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig

import platforms
from engine.distributed.launcher import join_group
from engine.distributed.parallel_state import destroy_tp_group
from engine.model_loader import load_model
from engine.models import check_tensor_parallel
from test_models import REFERENCE, random_sequences, run_schedule
from tiny_models import TINY_MODELS, tiny_model_factory  # noqa: F401

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
