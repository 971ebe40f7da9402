"""Native models equal transformers, token for token, through a paged KV cache.

Each tiny architecture (tests/tiny_models.py) runs a schedule of steps over
several packed sequences: a first step that prefills some sequences whole and
one in part, then steps mixing a chunked-prefill remainder with decode tokens.
Block tables are random permutations of a pool, so a model that ignored them
would read other sequences' keys. Every new token's logits must equal HF's
float32 logits of the full sequence (no cache) at that position.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

import engine.model_loader as model_loader
import platforms
from engine.attention_metadata import AttentionMetadata
from engine.model_loader import load_model
from engine.models import get_model_class
from engine.models.cpu_weights import can_pack
from tiny_models import hf_reference_model, tiny_model, tiny_model_factory  # noqa: F401

# SCHEDULE[step][seq] = new tokens of that sequence in that step (0 = not scheduled)
SCHEDULE = [[6, 10, 1, 14], [1, 13, 0, 1], [1, 0, 0, 1], [1, 0, 0, 0]]
BLOCK_SIZE = 4
FLOAT32_TOLERANCE = dict(atol=1e-4, rtol=1e-4)
REFERENCE = platforms.get("cpu").attention_backend("reference")


class PagedBatchRunner:
    """Runs packed steps of several sequences through a model with a paged KV cache."""

    def __init__(self, model, token_ids: list[torch.Tensor], block_size: int, seed: int):
        self.model, self.token_ids, self.block_size = model, token_ids, block_size
        generator = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-len(t) // block_size) for t in token_ids]
        num_blocks = sum(blocks_per_seq) + 3
        pool = torch.randperm(num_blocks, generator=generator).tolist()
        self.block_tables = [[pool.pop() for _ in range(n)] for n in blocks_per_seq]
        dtype = next(model.parameters()).dtype
        shape = REFERENCE.kv_cache_shape(num_blocks, block_size, model.num_kv_heads,
                                         model.head_size)
        # NaN-filled: reading a slot no token wrote poisons the logits.
        self.kv_caches = [(torch.full(shape, float("nan"), dtype=dtype),
                           torch.full(shape, float("nan"), dtype=dtype))
                          for _ in range(model.num_layers)]
        self.num_computed = [0] * len(token_ids)

    def step(self, num_new_tokens: list[int]) -> dict[int, torch.Tensor]:
        """Compute `num_new_tokens[i]` tokens of sequence i -> {i: logits [n_i, vocab]}."""
        scheduled = [i for i, n in enumerate(num_new_tokens) if n > 0]
        input_ids, positions, slots, seq_lens, query_start_loc = [], [], [], [], [0]
        for i in scheduled:
            start, n = self.num_computed[i], num_new_tokens[i]
            pos = torch.arange(start, start + n)
            table = torch.tensor(self.block_tables[i])
            input_ids.append(self.token_ids[i][start:start + n])
            positions.append(pos)
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            seq_lens.append(start + n)
            query_start_loc.append(query_start_loc[-1] + n)
        max_blocks = max(len(self.block_tables[i]) for i in scheduled)
        block_tables = torch.full((len(scheduled), max_blocks), -1, dtype=torch.int32)
        for row, i in enumerate(scheduled):
            block_tables[row, :len(self.block_tables[i])] = torch.tensor(self.block_tables[i])
        attn = AttentionMetadata(
            slot_mapping=torch.cat(slots), block_tables=block_tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
            max_seq_len=max(seq_lens), max_query_len=max(num_new_tokens))
        with torch.inference_mode():
            hidden = self.model(torch.cat(input_ids), torch.cat(positions), attn, self.kv_caches)
            logits = self.model.compute_logits(hidden)
        for i in scheduled:
            self.num_computed[i] += num_new_tokens[i]
        return {i: logits[query_start_loc[row]:query_start_loc[row + 1]]
                for row, i in enumerate(scheduled)}


def run_schedule(model, token_ids: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Logits of every token of every sequence, computed step by step as SCHEDULE says."""
    runner = PagedBatchRunner(model, token_ids, BLOCK_SIZE, seed)
    per_seq: list[list[torch.Tensor]] = [[] for _ in token_ids]
    for num_new_tokens in SCHEDULE:
        for i, logits in runner.step(num_new_tokens).items():
            per_seq[i].append(logits)
    return [torch.cat(chunks) for chunks in per_seq]


def load_native(model_dir, dtype=torch.float32):
    return load_model(str(model_dir), dtype, "cpu", REFERENCE)


def random_sequences(vocab_size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [sum(step[i] for step in SCHEDULE) for i in range(len(SCHEDULE[0]))]
    return [torch.randint(0, vocab_size, (n,), generator=generator) for n in lengths]


def hf_logits(hf_model, token_ids: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf_model(ids.unsqueeze(0)).logits[0].float() for ids in token_ids]


def test_paged_prefill_and_decode_equal_hf(tiny_model):
    name, model_dir = tiny_model
    model, hf_config = load_native(model_dir)
    token_ids = random_sequences(hf_config.vocab_size, seed=len(name))
    ours = run_schedule(model, token_ids, seed=len(name))
    expected = hf_logits(hf_reference_model(model_dir), token_ids)
    for got, want in zip(ours, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("name", ["llama", "gpt_bigcode"])
def test_bfloat16_tracks_float32(tiny_model_factory, name):
    model_dir = tiny_model_factory(name)
    model, hf_config = load_native(model_dir, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    token_ids = random_sequences(hf_config.vocab_size, seed=1)
    ours = torch.cat(run_schedule(model, token_ids, seed=1))
    want = torch.cat(hf_logits(hf_reference_model(model_dir), token_ids))
    assert ours.dtype == torch.float32
    # bfloat16 keeps 8 mantissa bits: a few percent of the logit spread.
    assert (ours - want).abs().max() < 0.05 * want.abs().max()
    assert (ours.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                    reason="this CPU's oneDNN has no native bfloat16: weights are not packed")
@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_packed_cpu_weights_give_the_plain_weights_logits(tiny_model_factory, name, monkeypatch):
    """bfloat16 on CPU packs the linear weights for oneDNN once at load
    (engine.models.cpu_weights): the same logits, bit for bit."""
    model_dir = tiny_model_factory(name)
    packed, hf_config = load_native(model_dir, torch.bfloat16)
    assert all(m.weight is None and m.packed_weight is not None
               for m in packed.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(model_loader, "can_pack", lambda device, dtype: False)
    plain, _ = load_native(model_dir, torch.bfloat16)
    token_ids = random_sequences(hf_config.vocab_size, seed=2)
    for got, want in zip(run_schedule(packed, token_ids, seed=2),
                         run_schedule(plain, token_ids, seed=2)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_wrong_number_of_kv_caches_is_rejected(tiny_model_factory):
    model, _ = load_native(tiny_model_factory("llama"))
    attn = AttentionMetadata(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.int32),
                             torch.ones(1, dtype=torch.int32),
                             torch.tensor([0, 1], dtype=torch.int32), 1, 1)
    with pytest.raises(ValueError, match="kv_caches"):
        model(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), attn, [])


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_rejected(rope_type):
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0,
            "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                         intermediate_size=64, max_position_embeddings=128,
                         architectures=["LlamaForCausalLM"], rope_parameters=rope)
    with pytest.raises(ValueError, match=f"rope_type '{rope_type}'"):
        get_model_class(config)(config, REFERENCE)
