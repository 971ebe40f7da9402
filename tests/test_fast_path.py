"""The GPU fast path's parts, checked where they run: the Triton interpreter on CPU, the GPU
when there is one.

- the fused kernels (engine.models.fused) compute what the plain layers compute;
- `FusedLlamaForward` gives the model's own hidden states;
- a decode step staged by `InputBuffers` and padded for a CUDA graph gives the
  unpadded step's rows (padding writes no KV and reads none);
- `GpuModelRunner` (staging, fused layers, greedy shortcut) picks the plain
  runner's greedy tokens, end to end through `LLM`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine.engine_setup as engine_setup
import platforms
from cpu_threads import single_torch_thread  # noqa: F401
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.cuda_graphs import capture_sizes
from engine.gpu_model_runner import GpuModelRunner
from engine.model_runner import plain_greedy
from engine.model_loader import load_model
from engine.models import fused
from engine.models.fused import rms_norm, rotary_, silu_and_mul
from engine.models.fused_forward import FusedLlamaForward
from engine.models.layers import RMSNorm, apply_rotary
from engine.step_inputs import pack_step_inputs
from platforms.cpu.fused_ops import cpu_fused_ops
from platforms.rocm.backend import TritonAttentionBackend
from tiny_models import tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: the interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest: up to
#: 1 ulp per rounding, two roundings deep
TOLERANCES = {torch.float32: dict(rtol=1e-6, atol=1e-6),
              torch.bfloat16: dict(rtol=2 ** -6, atol=2 ** -6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_gate_match_the_plain_layers(dtype):
    generator = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(5, 96, generator=generator).to(DEVICE, dtype) for _ in range(2))
    norm = RMSNorm(96, 1e-6).to(DEVICE, dtype)
    norm.weight.data = torch.randn(96, generator=generator).to(DEVICE, dtype)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), **TOLERANCES[dtype])
    summed = residual + x
    normed = rms_norm(x, norm.weight, norm.eps, residual)
    torch.testing.assert_close(residual, summed, **TOLERANCES[dtype])
    torch.testing.assert_close(normed, norm(summed), **TOLERANCES[dtype])
    gate_up = torch.randn(5, 2 * 40, generator=generator).to(DEVICE, dtype)
    torch.testing.assert_close(silu_and_mul(gate_up),
                               F.silu(gate_up[:, :40]) * gate_up[:, 40:], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_rotates_strided_q_and_k_in_place(dtype):
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, head_size, num_tokens = 4, 2, 16, 6
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_size,
                      generator=generator).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], -1)
    q, k = q.view(num_tokens, heads, head_size), k.view(num_tokens, kv_heads, head_size)
    angles = torch.rand(32, head_size // 2, generator=generator) * 6.0
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    positions = torch.randint(0, 32, (num_tokens,), generator=generator).to(DEVICE)
    want_q, want_k = (apply_rotary(t, cos[positions], sin[positions]) for t in (q, k))
    v_before = v.clone()
    rotary_(q, k, positions, cos, sin)
    torch.testing.assert_close(q, want_q, **TOLERANCES[dtype])
    torch.testing.assert_close(k, want_k, **TOLERANCES[dtype])
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("ops_name", ["triton", "cpu"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_fused_llama_forward_gives_the_models_hidden_states(name, ops_name, tiny_model_factory):
    """With the Triton ops (engine.models.fused) and, on CPU tensors, the CPU's compiled ones."""
    if ops_name == "cpu":
        if DEVICE.type != "cpu":
            pytest.skip("the CPU's fused ops take CPU tensors; this run is on a GPU")
        ops = cpu_fused_ops()  # float32 here; the engine uses them in bfloat16
        if ops is None:
            pytest.skip("no C++ compiler here: the CPU's fused ops cannot be built")
    else:
        ops = fused
    model, _ = load_model(str(tiny_model_factory(name)), torch.float32, DEVICE,
                          TritonAttentionBackend())
    num_new = np.array([7, 3, 12])
    block_tables = np.arange(6, dtype=np.int32).reshape(3, 2)
    token_ids = np.random.default_rng(3).integers(4, 300, int(num_new.sum()))
    inputs = pack_step_inputs(token_ids, np.zeros(3, np.int64), num_new, block_tables,
                              np.ones(3, bool), 8, DEVICE)

    def hidden(forward) -> torch.Tensor:
        shape = (6, 8, model.num_kv_heads, model.head_size)
        caches = [(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
                  for _ in range(model.num_layers)]
        with torch.inference_mode():
            return forward(inputs.input_ids, inputs.positions, inputs.attn, caches)

    torch.testing.assert_close(hidden(FusedLlamaForward(model, 64, ops)), hidden(model),
                               rtol=1e-5, atol=1e-5)


def test_padded_decode_step_gives_the_unpadded_rows(tiny_model_factory):
    """The padding a CUDA graph replays with (slot -1, empty context) leaves real rows alone."""
    model_dir = str(tiny_model_factory("llama"))
    backend = TritonAttentionBackend()
    model, _ = load_model(model_dir, torch.float32, DEVICE, backend)
    config = EngineConfig(model=model_dir, device=DEVICE.type, max_model_len=64,
                          max_num_seqs=8, kv_cache_memory=1 << 20)
    config.resolve_model_limits(256)
    runner = GpuModelRunner(config, platforms.get(DEVICE.type), backend, model)
    runner.kv_caches = runner._allocate(12)
    for key_cache, value_cache in runner.kv_caches:
        key_cache.fill_(float("nan"))
        value_cache.fill_(float("nan"))
    block_tables = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], np.int32)
    context = np.array([5, 20, 9])
    rng = np.random.default_rng(4)

    def step(num_computed, num_new, pad_to=None) -> torch.Tensor:
        inputs = pack_step_inputs(rng.integers(4, 300, int(num_new.sum())), num_computed,
                                  num_new, block_tables, np.ones(3, bool), 16, torch.device("cpu"))
        with torch.inference_mode():
            return runner.forward(runner.buffers.stage(inputs, pad_to=pad_to))

    step(np.zeros(3, np.int64), context)
    rng_state = rng.bit_generator.state
    unpadded = step(context, np.ones(3, np.int64))
    rng.bit_generator.state = rng_state
    padded = step(context, np.ones(3, np.int64), pad_to=8)
    assert padded.shape[0] == 8
    torch.testing.assert_close(padded[:3], unpadded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_gpu_runner_picks_the_plain_runners_greedy_tokens(name, tiny_model_factory,
                                                         monkeypatch):
    model_dir = str(tiny_model_factory(name))
    generator = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(4, 390, (n,), generator=generator).tolist()}
               for n in (3, 17, 40, 1)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    plain = LLM(model_dir, device=DEVICE.type, dtype="float32", max_model_len=64,
                enforce_eager=True)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(engine_setup, "make_model_runner", GpuModelRunner)
    fast = LLM(model_dir, device=DEVICE.type, dtype="float32", max_model_len=64)
    assert isinstance(fast.llm_engine.model_runner, GpuModelRunner)
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    assert got == want


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1) == [1]


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=0.0), True),
    (SamplingParams(temperature=0.0, min_tokens=3), True),  # checked per request
    (SamplingParams(temperature=0.8), False),
    (SamplingParams(temperature=0.0, logprobs=2), False),
    (SamplingParams(temperature=0.0, repetition_penalty=1.2), False),
    (SamplingParams(temperature=0.0, presence_penalty=0.5), False),
    (SamplingParams(temperature=0.0, logit_bias={5: 3.0}), False),
])
def test_plain_greedy_is_argmax_only_without_logit_changes(params, expected):
    assert plain_greedy(params) is expected
