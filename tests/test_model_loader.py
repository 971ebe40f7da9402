"""The loader: model paths, checkpoint formats, dtypes, bad input, the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig

import engine.model_loader as model_loader
import platforms
import platforms.cpu
from engine.model_loader import DEFAULT_MODEL, load_model, resolve_dtype, resolve_model
from engine.models import SUPPORTED_ARCHITECTURES, get_model_class
from test_models import REFERENCE, PagedBatchRunner, load_native
from tiny_models import tiny_model_factory  # noqa: F401


def assert_same_weights(model_a, model_b) -> None:
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def checkpoint_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def write_bin_shards(state: dict[str, torch.Tensor], out_dir: Path, num_shards: int) -> None:
    """A pytorch .bin checkpoint: one file, or `num_shards` files and their index."""
    out_dir.mkdir()
    names = sorted(state)
    if num_shards == 1:
        torch.save(state, out_dir / "pytorch_model.bin")
        return
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        part = {n: state[n] for n in names[shard::num_shards]}
        torch.save(part, out_dir / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sharded_safetensors_load_like_one_file(tiny_model_factory, tmp_path, name):
    model_dir = tiny_model_factory(name)
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(tmp_path,
                                                                    max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_same_weights(load_native(tmp_path)[0], load_native(model_dir)[0])


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_pytorch_bin_checkpoints_load_like_safetensors(tiny_model_factory, tmp_path, name,
                                                       num_shards):
    model_dir = tiny_model_factory(name)
    bin_dir = tmp_path / "bin"
    write_bin_shards(checkpoint_state(model_dir), bin_dir, num_shards)
    (bin_dir / "config.json").write_text((model_dir / "config.json").read_text())
    assert_same_weights(load_native(bin_dir)[0], load_native(model_dir)[0])


def test_missing_unexpected_and_misshaped_weights_are_rejected(tiny_model_factory):
    model_dir = tiny_model_factory("qwen3")
    model, _ = load_native(model_dir)
    state = checkpoint_state(model_dir)
    missing = dict(state)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing weights: .*layers\.1\.self_attn\.qkv_proj"):
        model.load_weights(missing.items())
    with pytest.raises(ValueError, match="model.layers.0.extra.weight"):
        model.load_weights([*state.items(), ("model.layers.0.extra.weight", torch.zeros(2))])
    misshaped = dict(state, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        model.load_weights(misshaped.items())


def test_checkpoint_without_weights_is_rejected(tiny_model_factory, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_factory("llama") / "config.json").read_text())
    with pytest.raises(ValueError, match="no weights"):
        load_native(tmp_path)


@pytest.mark.parametrize("kind", ["missing directory", "no config.json"])
def test_unknown_model_path_is_rejected(tmp_path, kind):
    path = tmp_path / "missing" if kind == "missing directory" else tmp_path
    with pytest.raises(ValueError, match=f"unknown model path '{path}'"):
        resolve_model(str(path))


def test_model_of_the_wrong_type_is_rejected():
    with pytest.raises(ValueError, match="model must be a path"):
        resolve_model(42)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, architectures=["BertForMaskedLM"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BertForMaskedLM") as err:
        load_model(resolve_model(str(tmp_path)), torch.float32, "cpu", REFERENCE)
    assert all(name in str(err.value) for name in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="architectures"):
        get_model_class(BertConfig())


@pytest.mark.parametrize("dtype, platform, native_bf16, config_dtype, expected", [
    # CPUs: vLLM's bfloat16, only where the CPU multiplies it natively
    ("auto", "cpu", True, "float32", torch.bfloat16),
    ("auto", "cpu", True, "float16", torch.bfloat16),
    ("auto", "cpu", True, "bfloat16", torch.bfloat16),
    ("auto", "cpu", False, "float32", torch.float32),
    ("auto", "cpu", False, "float16", torch.float32),
    ("auto", "cpu", False, "bfloat16", torch.float32),
    # GPUs: the checkpoint's half type, bfloat16 for a float32 checkpoint
    ("auto", "cuda", False, "bfloat16", torch.bfloat16),
    ("auto", "cuda", False, "float16", torch.float16),
    ("auto", "cuda", False, "float32", torch.bfloat16),
    # an explicit dtype wins everywhere
    ("float16", "cpu", True, "float32", torch.float16),
    ("float32", "cpu", True, "bfloat16", torch.float32),
    (torch.bfloat16, "cpu", False, "float32", torch.bfloat16),
])
def test_resolve_dtype(monkeypatch, dtype, platform, native_bf16, config_dtype, expected):
    monkeypatch.setattr(platforms.cpu, "has_native_bf16", lambda: native_bf16)
    config = BertConfig(dtype=config_dtype)
    assert resolve_dtype(dtype, config, platforms.get(platform)) == expected


@pytest.mark.parametrize("avx512_bf16, amx_tile, expected", [
    (True, False, True), (False, True, True), (False, False, False)])
def test_native_bf16_is_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx_tile, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx_tile)
    assert platforms.cpu.has_native_bf16() == expected


@pytest.mark.parametrize("dtype", ["float64", "fp8", torch.int8])
def test_unsupported_dtype_is_rejected(dtype):
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(dtype, BertConfig(), platforms.get("cpu"))


@pytest.mark.parametrize("dtype", ["auto", "float32", torch.float64])
def test_load_model_takes_a_resolved_dtype(tiny_model_factory, dtype):
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_model_factory("llama")), dtype, "cpu", REFERENCE)


def test_cache_root_follows_pagedllm_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path))
    assert model_loader.cache_root() == tmp_path
    monkeypatch.delenv("PAGEDLLM_CACHE")
    assert model_loader.cache_root() == Path.home() / ".cache" / "pagedllm"


def default_model_prompt_logits():
    """(tokenizer, prompt ids, native float32 logits) of the default model on the prompt."""
    model_dir = resolve_model(None)
    assert resolve_model(DEFAULT_MODEL) == model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    model, _ = load_model(model_dir, torch.float32, "cpu", REFERENCE)
    logits = PagedBatchRunner(model, [token_ids], block_size=4, seed=0).step([len(token_ids)])[0]
    return tokenizer, token_ids, logits


def hf_prompt_logits(hf_model, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(token_ids.unsqueeze(0)).logits[0].float()


def test_default_model_equals_hf_and_knows_paris():
    """The first run converts the GGUF into the cache (slow once); later runs reuse it."""
    tokenizer, token_ids, logits = default_model_prompt_logits()
    hf_model = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32)
    torch.testing.assert_close(logits, hf_prompt_logits(hf_model, token_ids),
                               atol=1e-4, rtol=1e-4)
    assert tokenizer.decode(logits[-1].argmax()) == " Paris"


@pytest.mark.slow
def test_default_model_conversion_equals_hf_gguf_load():
    """The cached conversion computes what transformers computes from the GGUF itself.

    Slow (~15 s of CPU): transformers parses the GGUF twice on every load.
    """
    _, token_ids, logits = default_model_prompt_logits()
    gguf = model_loader.default_gguf_path()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32)
    torch.testing.assert_close(logits, hf_prompt_logits(hf_model, token_ids),
                               atol=1e-4, rtol=1e-4)
