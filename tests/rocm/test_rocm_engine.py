"""The engine on the rocm platform, and its Triton backend asked for on NVIDIA.

Without an AMD GPU, `LLM(device="rocm")` is refused with the missing
hardware named. On an NVIDIA GPU the same Triton kernels serve a model when
asked for by name, and must pick the same greedy tokens as the CUDA kernels
on a tiny float32 model.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tiny_models import tiny_model_factory  # noqa: F401

HAS_AMD_GPU = torch.version.hip is not None and torch.cuda.is_available()
PROMPTS = ["The capital of France is", "def add(a, b):",
           {"prompt_token_ids": list(range(5, 75))}]


@pytest.mark.skipif(HAS_AMD_GPU, reason="an AMD GPU is present here")
def test_llm_on_rocm_without_an_amd_gpu_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"device='rocm'.*AMD GPU"):
        LLM(model=str(tmp_path), device="rocm")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_triton_backend_on_nvidia_picks_the_cuda_backends_greedy_tokens(name,
                                                                      tiny_model_factory):
    model_dir = str(tiny_model_factory(name))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for backend in ("cuda", "triton"):
        llm = LLM(model_dir, device="cuda", dtype="float32", attention_backend=backend)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        tokens[backend] = [output.outputs[0].token_ids for output in outputs]
        del llm
        torch.cuda.empty_cache()
    assert all(len(ids) == 24 for ids in tokens["cuda"])
    assert tokens["triton"] == tokens["cuda"]
