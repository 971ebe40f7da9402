// Split-K paged attention on CUDA cores, one query token per CTA: the path
// for fp32 (no fp32 tensor-core format keeps fp32 accuracy) and for GPUs
// without sm80 tensor-core instructions. Same grid and epilogue as
// decode_mma.cuh, with up to 8 query heads of a GQA group per CTA: the 4
// warps take keys round-robin, lane j holds dims j, j + 32, ... of each head.
#pragma once

#include "common.cuh"
#include "work.cuh"

namespace pagedllm {

template <int HEAD>
struct DecodeSimpleShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRows = 8;                          // query heads per CTA
  static constexpr int kPerLane = (HEAD + kWarpSize - 1) / kWarpSize;
};

template <typename T, int HEAD>
__device__ __forceinline__ void load_row(const T* src, int lane,
                                         float (&dst)[DecodeSimpleShape<HEAD>::kPerLane]) {
#pragma unroll
  for (int i = 0; i < DecodeSimpleShape<HEAD>::kPerLane; ++i) {
    const int d = lane + i * kWarpSize;
    dst[i] = d < HEAD ? Convert<T>::to_float(src[d]) : 0.f;
  }
}

template <typename T, int HEAD>
__global__ void __launch_bounds__(DecodeSimpleShape<HEAD>::kThreads)
    decode_simple_kernel(AttentionParams p) {
  using S = DecodeSimpleShape<HEAD>;
  __shared__ float o_smem[S::kWarps * S::kRows * HEAD];
  __shared__ float ml_smem[S::kWarps * S::kRows * 2];

  DecodeWork w;
  if (!decode_work<S::kRows, 1>(p, w)) return;
  const HeadChunk chunk = head_chunk<S::kRows>(p, w.first_chunk);
  const Operands<T> ops = operands<T>(p);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const float scale_log2 = p.scale * kLog2e;
  float q[S::kRows][S::kPerLane], o[S::kRows][S::kPerLane] = {};
  float m[S::kRows], l[S::kRows];
#pragma unroll
  for (int r = 0; r < S::kRows; ++r) {
    const int head = chunk.head0 + min(r, chunk.num_rows - 1);  // spare rows repeat a real head
    load_row<T, HEAD>(query_row(p, ops.query, w.token, head), lane, q[r]);
#pragma unroll
    for (int i = 0; i < S::kPerLane; ++i) q[r][i] *= scale_log2;
    m[r] = -INFINITY;
    l[r] = 0.f;
  }

  for (int pos = w.start + warp; pos < w.end; pos += S::kWarps) {
    const int64_t offset = cache_row_offset(p, w.seq, pos, w.end, chunk.kv_head);
    float k[S::kPerLane], v[S::kPerLane];
    load_row<T, HEAD>(ops.key_cache + offset, lane, k);
    load_row<T, HEAD>(ops.value_cache + offset, lane, v);
#pragma unroll
    for (int r = 0; r < S::kRows; ++r) {
      float score = 0.f;
#pragma unroll
      for (int i = 0; i < S::kPerLane; ++i) score += q[r][i] * k[i];
#pragma unroll
      for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) {
        score += __shfl_xor_sync(0xffffffffu, score, mask);
      }
      const float m_new = fmaxf(m[r], score);
      const float alpha = exp2f(m[r] - m_new), weight = exp2f(score - m_new);
      m[r] = m_new;
      l[r] = l[r] * alpha + weight;
#pragma unroll
      for (int i = 0; i < S::kPerLane; ++i) o[r][i] = o[r][i] * alpha + weight * v[i];
    }
  }

#pragma unroll
  for (int r = 0; r < S::kRows; ++r) {
#pragma unroll
    for (int i = 0; i < S::kPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      if (d < HEAD) o_smem[(warp * S::kRows + r) * HEAD + d] = o[r][i];
    }
    if (lane == 0) {
      ml_smem[(warp * S::kRows + r) * 2] = m[r];
      ml_smem[(warp * S::kRows + r) * 2 + 1] = l[r];
    }
  }
  __syncthreads();
  finish_partition<T, HEAD, S::kWarps, S::kRows, 1>(p, o_smem, ml_smem, w);
}

}  // namespace pagedllm
