"""The CUDA kernels compile without a GPU, and the platform needs none to load.

Every .cu file of platforms/cuda/csrc is compiled with nvcc for Ampere
(sm_80) and Hopper (sm_90a), all of them concurrently in one fixture; ptxas
must report no register spills (a spilled accumulator would quietly move the
hot loop to local memory); so must benchmarks/decode_variants.cu, the decode
launch-shape sweep, for Hopper. The binding (binding.cpp) needs a CUDA build of
torch and is only built on a GPU machine (tests/test_cuda_gpu.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import platforms
from platforms.cuda import backend as backend_module, build
from platforms.cuda.backend import (MIN_PARTITION, PARTITION_ALIGN, SUPPORTED_HEAD_SIZES,
                                    CudaAttentionBackend, split_plan)

ARCHS = {"sm_80": "-arch=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
CU_FILES = sorted(p.name for p in build.CSRC.glob("*.cu"))
# The decode launch-shape sweep (benchmarks/decode_variants.py) instantiates
# the kernel in shapes the JIT build does not; Hopper is where it is run.
VARIANTS_CU = build.CSRC.parents[2] / "benchmarks" / "decode_variants.cu"
NVCC = build.find_nvcc()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(file, arch): (returncode, compiler output)}, compiled in parallel."""
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit on PATH or CUDA_HOME): "
                    "cannot compile-check the CUDA kernels")
    out_dir = tmp_path_factory.mktemp("cuda-objs")

    def compile_one(job):
        name, arch = job
        source = VARIANTS_CU if name == VARIANTS_CU.name else build.CSRC / name
        cmd = [NVCC, "-c", "-std=c++17", "-O3", ARCHS[arch], "--ptxas-options=-warn-spills",
               str(source), "-o", str(out_dir / f"{name}.{arch}.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        return job, (proc.returncode, proc.stdout + proc.stderr)

    jobs = [(name, arch) for name in CU_FILES for arch in ARCHS] + [(VARIANTS_CU.name, "sm_90a")]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(pool.map(compile_one, jobs))
    print(f"\nnvcc compiled {len(jobs)} (file, arch) pairs in "
          f"{time.perf_counter() - started:.1f} s")
    return results


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name", CU_FILES)
def test_kernel_file_compiles_without_spills(compiled, name, arch):
    returncode, output = compiled[(name, arch)]
    assert returncode == 0, output[-4000:]
    assert not re.search(r"spill|warning", output, re.IGNORECASE), output[-4000:]


def test_decode_variant_sweep_compiles_without_spills(compiled):
    returncode, output = compiled[(VARIANTS_CU.name, "sm_90a")]
    assert returncode == 0, output[-4000:]
    assert not re.search(r"spill|warning", output, re.IGNORECASE), output[-4000:]


def test_every_translation_unit_is_compiled_by_the_jit_build():
    compiled_sources = {name for name in build.SOURCES if name.endswith(".cu")}
    assert compiled_sources == set(CU_FILES)
    assert set(build.SOURCES) - compiled_sources == {"binding.cpp"}


def test_kernel_sources_stay_free_of_aten():
    for path in build.source_files():
        if path.name != "binding.cpp":
            includes = re.findall(r'#include\s*[<"]([^>"]+)', path.read_text())
            assert includes and not [i for i in includes if i.split("/")[0] in
                                     ("torch", "ATen", "c10", "pybind11")], path.name


def test_getting_the_backend_needs_no_gpu_and_builds_nothing(monkeypatch):
    def no_build():
        raise AssertionError("the extension must not be built to create the backend")

    monkeypatch.setattr(build, "load_extension", no_build)
    monkeypatch.setattr(backend_module, "load_extension", no_build)
    monkeypatch.delitem(platforms._INSTANCES, "cuda", raising=False)
    cuda = platforms.get("cuda")
    backend = cuda.attention_backend("cuda")
    assert isinstance(backend, CudaAttentionBackend)
    assert cuda.backend_names() == ["triton", "cuda"] and backend.name == "cuda"
    assert cuda.attention_backend().name == "triton"
    assert (cuda.device, cuda.dist_backend) == ("cuda", "nccl")
    assert tuple(backend.supported_head_sizes) == SUPPORTED_HEAD_SIZES
    assert backend.kv_cache_shape(10, 16, 8, 128) == (10, 16, 8, 128)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on GPU-less machines")
def test_unavailable_platform_names_what_is_missing():
    cuda = platforms.get("cuda")
    assert not cuda.is_available()
    reason = cuda.unavailable_reason()
    assert "cuda" in reason and ("CUDA build of torch" in reason or "NVIDIA GPU" in reason)
    with pytest.raises(build.CudaBuildError, match="CPU-only build|NVIDIA GPU|nvcc"):
        build.load_extension()


def test_build_hash_follows_sources_and_target(monkeypatch, tmp_path):
    assert build.build_hash((9, 0)) == build.build_hash((9, 0))
    assert build.build_hash((9, 0)) != build.build_hash((8, 0))
    for path in build.source_files():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    before = build.build_hash((9, 0))
    monkeypatch.setattr(build, "CSRC", tmp_path)
    assert build.build_hash((9, 0)) == before
    (tmp_path / "common.cuh").write_text((tmp_path / "common.cuh").read_text() + "\n// edit\n")
    assert build.build_hash((9, 0)) != before


def test_build_directory_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.cache_root() == tmp_path / "pagedllm" / "cuda-ext"


@pytest.mark.parametrize("shape,dtype,message", [
    ((4, 8), torch.float16, "query: must be"),
    ((4, 8, 72), torch.float16, "query: head_size 72 not supported"),
    ((4, 8, 64), torch.int8, "query: dtype torch.int8 not supported"),
    ((4, 8, 64), torch.float16, "query: must be on a CUDA device"),
])
def test_bad_query_is_a_value_error_before_any_build(shape, dtype, message):
    query = torch.zeros(shape, dtype=dtype)
    kv = torch.zeros(4, 2, 64, dtype=torch.float16)
    cache = torch.zeros(3, 16, 2, 64, dtype=torch.float16)
    index = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        CudaAttentionBackend().forward(query, kv, kv, cache, cache,
                                       torch.zeros(4, dtype=torch.int64), index.view(1, 1),
                                       index, torch.zeros(2, dtype=torch.int32), 0.125)


@pytest.mark.parametrize("num_tokens,max_context,num_sms", [
    (1, 100, 132), (1, 32768, 132), (32, 512, 132), (128, 2048, 132), (256, 4096, 132),
    (4, 70000, 108), (2000, 300, 132),
])
def test_split_plan_covers_the_context_with_aligned_partitions(num_tokens, max_context,
                                                               num_sms):
    partition, splits = split_plan(num_tokens, 8, max_context, num_sms)
    assert partition % PARTITION_ALIGN == 0 and splits >= 1
    assert (splits - 1) * partition < max_context <= splits * partition
    assert splits == 1 or partition >= MIN_PARTITION // 2, "no tiny partitions"


def test_split_plan_splits_small_batches_to_fill_the_gpu():
    _, splits = split_plan(1, 8, 32768, 132)
    assert splits * 8 >= 0.9 * 132, "a lone long context is spread over (almost) every SM"
    assert split_plan(4096, 8, 4096, 132)[1] == 1, "a large batch fills the GPU unsplit"
