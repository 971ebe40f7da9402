// Launch logic for one dtype: head-size dispatch, grids, split-K combine.
// Included by the per-dtype translation units (attention_{fp16,bf16,fp32}.cu)
// so nvcc compiles the three dtypes in parallel.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "decode_mma.cuh"
#include "decode_simple.cuh"
#include "prefill_mma.cuh"

namespace pagedllm {

template <typename F>
cudaError_t with_head_size(int head_size, F&& f) {
  switch (head_size) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename Kernel>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, size_t smem_bytes,
                          cudaStream_t stream, const AttentionParams& p) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
__global__ void combine_splits_kernel(AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * p.num_heads + blockIdx.y;
  const float* ml = p.partial_ml + row * p.num_splits * 2;
  const float* partial = p.partial_out + row * p.num_splits * p.head_size;
  float m = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) {
    if (ml[2 * s + 1] > 0.f) m = fmaxf(m, ml[2 * s]);
  }
  for (int d = threadIdx.x; d < p.head_size; d += blockDim.x) {
    float acc = 0.f, denom = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      if (ml[2 * s + 1] <= 0.f) continue;  // empty partition: its output was never written
      const float weight = exp2f(ml[2 * s] - m) * ml[2 * s + 1];
      acc += weight * partial[s * p.head_size + d];
      denom += weight;
    }
    static_cast<T*>(p.out)[row * p.head_size + d] = Convert<T>::from_float(acc / denom);
  }
}

// The tensor-core decode shape launched. Heads 64 and 128: 4 warps on one
// head chunk, each streaming 32-token tiles through a 3-deep cp.async ring
// with 256-byte L2 prefetch, Q reloaded from smem (the fastest of the shapes
// benchmarks/decode_variants.py timed on the H100; benchmarks/RESULTS.md has
// the table). Other heads keep 16-token tiles in a 2-deep ring: at head 96
// the deeper shape spills registers, at 256 it exceeds the shared memory.
template <int HEAD>
using DecodeMmaFor =
    std::conditional_t<HEAD == 64 || HEAD == 128, DecodeMmaShape<HEAD, 32, 3, 4, 1, 256, false>,
                       DecodeMmaShape<HEAD, 16, 2, 4, 1, 0, false>>;

template <typename T, int HEAD, typename S>
cudaError_t launch_decode_mma(const AttentionParams& p, cudaStream_t stream) {
  const DecodeGrid grid = decode_grid(p.num_heads, p.num_kv_heads, 16, S::kMaxWidth);
  return launch_kernel(decode_mma_kernel<T, HEAD, S>,
                       dim3(p.num_tokens * grid.ctas_per_token, p.num_splits), S::kThreads,
                       S::kSmemBytes, stream, p);
}

template <typename T>
cudaError_t launch_combine(const AttentionParams& p, cudaStream_t stream) {
  if (p.num_splits == 1) return cudaSuccess;
  combine_splits_kernel<T><<<dim3(p.num_tokens, p.num_heads), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_decode(const AttentionParams& p, bool use_tensor_cores, cudaStream_t stream) {
  const cudaError_t err = with_head_size(p.head_size, [&](auto head) -> cudaError_t {
    constexpr int HEAD = decltype(head)::value;
    if constexpr (!std::is_same_v<T, float>) {
      if (use_tensor_cores) return launch_decode_mma<T, HEAD, DecodeMmaFor<HEAD>>(p, stream);
    }
    using S = DecodeSimpleShape<HEAD>;
    const DecodeGrid grid = decode_grid(p.num_heads, p.num_kv_heads, S::kRows, 1);
    return launch_kernel(decode_simple_kernel<T, HEAD>,
                         dim3(p.num_tokens * grid.ctas_per_token, p.num_splits), S::kThreads, 0,
                         stream, p);
  });
  return err != cudaSuccess ? err : launch_combine<T>(p, stream);
}

template <typename T>
cudaError_t run_prefill(const AttentionParams& p, int max_query_len, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorNotSupported;
  } else {
    const int group = p.num_heads / p.num_kv_heads;
    return with_head_size(p.head_size, [&](auto head) -> cudaError_t {
      constexpr int HEAD = decltype(head)::value;
      using S = PrefillShape<HEAD>;
      const int row_tiles = (max_query_len * group + S::kRowsM - 1) / S::kRowsM;
      const dim3 grid(row_tiles, p.num_seqs, p.num_kv_heads);
      return launch_kernel(prefill_mma_kernel<T, HEAD>, grid, S::kThreads, S::kSmemBytes,
                           stream, p);
    });
  }
}

}  // namespace pagedllm
