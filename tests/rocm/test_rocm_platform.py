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


BAD_INPUTS = {
    "query": lambda args: args.update(query=args["query"][0]),
    "key": lambda args: args.update(key=args["key"][:3]),
    "value": lambda args: args.update(value=args["value"][:, :1]),
    "num_heads": lambda args: args.update(query=args["query"][:, :7]),
    "key_cache": lambda args: args.update(key_cache=args["key_cache"][..., :32]),
    "dtype": lambda args: args.update(query=args["query"].float()),
    "slot_mapping": lambda args: args.update(slot_mapping=args["slot_mapping"][:3]),
    "query_start_loc": lambda args: args.update(query_start_loc=args["query_start_loc"][:2]),
    "block_tables": lambda args: args.update(block_tables=args["block_tables"][:1]),
}


@pytest.mark.parametrize("field", sorted(BAD_INPUTS))
def test_bad_input_is_a_value_error_naming_the_field(field):
    args = _inputs()
    BAD_INPUTS[field](args)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        TritonAttentionBackend().forward(**args)
