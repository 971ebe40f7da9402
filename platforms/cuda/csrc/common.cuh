// Device helpers shared by the PagedAttention kernels: dtype conversion,
// cp.async / ldmatrix / mma.sync wrappers and the split-K epilogue (which
// work a CTA does is work.cuh). Scores are kept in log2 units (scale *
// log2(e) folded into q·k) so the softmax uses exp2f.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "paged_attention.h"
#include "work.cuh"

namespace pagedllm {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarpSize = 32;

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// ---- sm80+ data movement and tensor-core primitives ----------------------

// Copies 16 bytes global -> shared asynchronously; writes zeros when !valid
// (then nothing is read, so masked slots may hold NaN poison).
template <int kL2Prefetch = 0>
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  if constexpr (kL2Prefetch == 256) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(addr),
                 "l"(gmem), "r"(src_size)
                 : "memory");
  } else if constexpr (kL2Prefetch == 128) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(addr),
                 "l"(gmem), "r"(src_size)
                 : "memory");
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
                 "r"(src_size)
                 : "memory");
  }
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
  }
#else
  __trap();
#endif
}

// d += a * b for one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// Lane offsets (row, column) for ldmatrix.x4 so that the four 8x8 matrices
// land as an m16n8k16 A fragment (rows 0-7/8-15 x k 0-7/8-15) ...
__device__ __forceinline__ int a_frag_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int a_frag_col(int lane) { return (lane >> 4) * 8; }
// ... as B fragments of two n8 tiles from row-major [n][k] storage (K rows) ...
__device__ __forceinline__ int b_frag_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int b_frag_col(int lane) { return ((lane >> 3) & 1) * 8; }
// ... and, with .trans, from row-major [k][n] storage (V rows): same as A.

// Scales one warp's output accumulators by the online softmax's correction:
// rows g (elements 0, 1) by alpha[0], rows g + 8 (elements 2, 3) by alpha[1].
template <int HEAD>
__device__ __forceinline__ void rescale_rows(float (&o)[HEAD / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < HEAD / 8; ++n) {
    o[n][0] *= alpha[0];
    o[n][1] *= alpha[0];
    o[n][2] *= alpha[1];
    o[n][3] *= alpha[1];
  }
}

// O += P V for one warp. The float score tiles s[kN8][4] (m16n8 accumulators
// over kN8 * 8 keys), two at a time, are exactly the A fragment of P for 16
// keys; V is kN8 * 8 rows of kRow elements (padded row-major) in smem.
template <typename T, int HEAD, int kN8, int kRow>
__device__ __forceinline__ void accumulate_pv(const float (&s)[kN8][4], const T* v_smem,
                                              int lane, float (&o)[HEAD / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kN8 / 2; ++kk) {
    const uint32_t pa[4] = {Convert<T>::pack2(s[2 * kk][0], s[2 * kk][1]),
                            Convert<T>::pack2(s[2 * kk][2], s[2 * kk][3]),
                            Convert<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                            Convert<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < HEAD / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4<true>(b, v_smem + (kk * 16 + a_frag_row(lane)) * kRow + dp * 16 +
                               a_frag_col(lane));
      mma_16816<T>(o[2 * dp], pa, b[0], b[1]);
      mma_16816<T>(o[2 * dp + 1], pa, b[2], b[3]);
    }
  }
}

// Merges the per-warp online-softmax states of one partition and writes the
// result: `out` when there is one split, else the partial buffers. Warp
// s * w.width + c holds stream s of the CTA's chunk c (kWarps / width streams;
// w.width <= kMaxWidth).
//   o_smem  [kWarps][kRows][HEAD] unnormalised outputs
//   ml_smem [kWarps][kRows][2]    (running max in log2 units, denominator)
// Must be called by every thread after a __syncthreads.
template <typename T, int HEAD, int kWarps, int kRows, int kMaxWidth>
__device__ __forceinline__ void finish_partition(const AttentionParams& p, const float* o_smem,
                                                 const float* ml_smem, const DecodeWork& w) {
  const int width = w.width, streams = kWarps / width;
#pragma unroll
  for (int c = 0; c < kMaxWidth; ++c) {
    if (c >= w.num_chunks) break;
    const HeadChunk chunk = head_chunk<kRows>(p, w.first_chunk + c);
    for (int idx = threadIdx.x; idx < chunk.num_rows * HEAD; idx += blockDim.x) {
      const int r = idx / HEAD, d = idx % HEAD;
      float m = -INFINITY;
#pragma unroll
      for (int s = 0; s < kWarps; ++s) {
        if (s < streams) m = fmaxf(m, ml_smem[((s * width + c) * kRows + r) * 2]);
      }
      float denom = 0.f, acc = 0.f;
#pragma unroll
      for (int s = 0; s < kWarps; ++s) {
        if (s >= streams) break;
        const int slot = (s * width + c) * kRows + r;
        const float weight = exp2f(ml_smem[slot * 2] - m);
        denom += weight * ml_smem[slot * 2 + 1];
        acc += weight * o_smem[slot * HEAD + d];
      }
      const int64_t row = static_cast<int64_t>(w.token) * p.num_heads + chunk.head0 + r;
      if (p.num_splits == 1) {
        static_cast<T*>(p.out)[row * HEAD + d] = Convert<T>::from_float(acc / denom);
      } else {
        const int64_t part = row * p.num_splits + w.split;
        p.partial_out[part * HEAD + d] = acc / denom;
        if (d == 0) {
          p.partial_ml[part * 2] = m;
          p.partial_ml[part * 2 + 1] = denom;
        }
      }
    }
  }
}

}  // namespace pagedllm
