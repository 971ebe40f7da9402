"""The rocm platform: detection, its contract names, and bad input to its backend."""

from __future__ import annotations

import pytest
import torch

import platforms
from platforms.rocm.backend import TritonAttentionBackend

HAS_AMD_GPU = torch.version.hip is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAS_AMD_GPU, reason="an AMD GPU is present here")
def test_rocm_is_unavailable_without_an_amd_gpu_and_says_so():
    platform = platforms.get("rocm")
    assert platform.is_available() is False
    reason = platform.unavailable_reason()
    assert "AMD GPU" in reason and "ROCm" in reason


def test_rocm_platform_uses_torch_cuda_names_and_the_triton_backend():
    platform = platforms.get("rocm")
    assert (platform.name, platform.device, platform.dist_backend) == ("rocm", "cuda", "nccl")
    assert platform.backend_names() == ["triton"]
    assert isinstance(platform.attention_backend(), TritonAttentionBackend)
    with pytest.raises(ValueError, match="'fast'"):
        platform.attention_backend("fast")


def _inputs(num_heads=8, num_kv_heads=2, head_size=64, dtype=torch.float16):
    """Valid forward arguments: 2 sequences of 3 and 1 new tokens, no context."""
    num_tokens, block_size = 4, 16
    cache = torch.zeros(4, block_size, num_kv_heads, head_size, dtype=dtype)
    return dict(
        query=torch.randn(num_tokens, num_heads, head_size).to(dtype),
        key=torch.randn(num_tokens, num_kv_heads, head_size).to(dtype),
        value=torch.randn(num_tokens, num_kv_heads, head_size).to(dtype),
        key_cache=cache, value_cache=cache.clone(),
        slot_mapping=torch.tensor([0, 1, 2, 16]),
        block_tables=torch.tensor([[0], [1]], dtype=torch.int32),
        seq_lens=torch.tensor([3, 1], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32),
        scale=head_size ** -0.5)


def _replace(field, make):
    """A mutation that sets `field` to make(args[field])."""
    return lambda args: args.update({field: make(args[field])})


#: (field the error must name, mutation of valid inputs), by case id
BAD_INPUTS = {
    "query-2d": ("query", _replace("query", lambda t: t[0])),
    "key-tokens": ("key", _replace("key", lambda t: t[:3])),
    "value-heads": ("value", _replace("value", lambda t: t[:, :1])),
    "heads-not-multiple": ("num_heads", _replace("query", lambda t: t[:, :7])),
    "cache-head-size": ("key_cache", _replace("key_cache", lambda t: t[..., :32])),
    "dtype-mismatch": ("dtype", _replace("query", lambda t: t.float())),
    "slot-mapping-length": ("slot_mapping", _replace("slot_mapping", lambda t: t[:3])),
    "slot-mapping-strided": ("slot_mapping", _replace(
        "slot_mapping", lambda t: torch.stack([t, t], dim=1)[:, 0])),
    "query-start-loc-length": ("query_start_loc", _replace("query_start_loc", lambda t: t[:2])),
    "block-tables-rows": ("block_tables", _replace("block_tables", lambda t: t[:1])),
    "block-tables-float": ("block_tables", _replace("block_tables", lambda t: t.float())),
    "seq-lens-2d": ("seq_lens", _replace("seq_lens", lambda t: t[None])),
    "value-cache-device": ("value_cache", _replace("value_cache", lambda t: t.to("meta"))),
    "scale-nan": ("scale", _replace("scale", lambda t: float("nan"))),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_value_error_naming_the_field(case):
    field, mutate = BAD_INPUTS[case]
    args = _inputs()
    mutate(args)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        TritonAttentionBackend().forward(**args)
