// The LLaMA family's elementwise work fused for the CPU, one pass over the
// data each (the CPU twins of engine/models/fused.py's Triton kernels):
//   rms_norm  out = weight * x / rms(x), with `residual`: first
//             residual <- x + residual (in place), then the norm of it;
//   rotary    rotate-half rotary embedding of q [T, H, D] and k [T, KVH, D]
//             in place, cos/sin rows [max_positions, D] at positions [T].
//   silu_and_mul  out [T, I] = silu(gate) * up of gate_up [T, 2I].
// Each rounds to the model dtype exactly where the plain PyTorch layers do
// (engine/models/layers.py), so in bfloat16 the two paths differ only in the
// order of the norm's sum. Rows are strided (views of packed projections),
// the last dimension contiguous. dtype: 0 float32, 1 bfloat16.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"

namespace {

template <typename T>
void rms_norm(T* out, const T* x, T* residual, const T* weight, int64_t rows, int hidden,
              int64_t x_stride, int64_t residual_stride, float eps, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> row(hidden);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
      const T* xt = x + t * x_stride;
      float sum = 0.f;
      if (residual != nullptr) {
        T* rt = residual + t * residual_stride;
        for (int d = 0; d < hidden; ++d) {
          const T summed = from_float<T>(to_float(xt[d]) + to_float(rt[d]));
          rt[d] = summed;
          row[d] = to_float(summed);
        }
      } else {
        for (int d = 0; d < hidden; ++d) row[d] = to_float(xt[d]);
      }
#pragma omp simd reduction(+ : sum)
      for (int d = 0; d < hidden; ++d) sum += row[d] * row[d];
      const float rstd = 1.f / std::sqrt(sum / hidden + eps);
      T* ot = out + t * hidden;
      for (int d = 0; d < hidden; ++d) {
        ot[d] = from_float<T>(to_float(weight[d]) * rounded<T>(row[d] * rstd));
      }
    }
  }
}

constexpr int kChunk = 256;  // elements per exp pass: the exps stay in L1

template <typename T>
void silu_and_mul(T* out, const T* gate_up, int64_t rows, int inter, int64_t stride,
                  int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t t = 0; t < rows; ++t) {
    const T* gate = gate_up + t * stride;
    const T* up = gate + inter;
    T* ot = out + t * inter;
    // Two passes per chunk: g++ leaves one loop of exp and division scalar.
    for (int i0 = 0; i0 < inter; i0 += kChunk) {
      const int n = std::min(kChunk, inter - i0);
      float e[kChunk];
#pragma omp simd
      for (int i = 0; i < n; ++i) e[i] = fast_exp(-to_float(gate[i0 + i]));
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        const float silu = rounded<T>(to_float(gate[i0 + i]) / (1.f + e[i]));
        ot[i0 + i] = from_float<T>(silu * to_float(up[i0 + i]));
      }
    }
  }
}

// Rotates the `heads` head vectors at x (one token, head stride `stride`).
template <typename T>
inline void rotate_heads(T* x, int heads, int64_t stride, int half, const T* cos,
                         const T* sin) {
  for (int h = 0; h < heads; ++h) {
    T* x1 = x + h * stride;
    T* x2 = x1 + half;
#pragma omp simd
    for (int d = 0; d < half; ++d) {
      const float a = to_float(x1[d]), b = to_float(x2[d]);
      const float c = to_float(cos[d]), s = to_float(sin[d]);
      // x * cos + rotate_half(x) * sin, each product rounded as the plain path does
      x1[d] = from_float<T>(rounded<T>(a * c) + rounded<T>(-b * s));
      x2[d] = from_float<T>(rounded<T>(b * c) + rounded<T>(a * s));
    }
  }
}

template <typename T>
void rotary(T* q, T* k, const int64_t* positions, const T* cos, const T* sin, int64_t tokens,
            int heads, int kv_heads, int head_size, int64_t q_stride_token,
            int64_t q_stride_head, int64_t k_stride_token, int64_t k_stride_head,
            int64_t table_stride, int num_threads) {
  const int half = head_size / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t t = 0; t < tokens; ++t) {
    // cos/sin rows are cat(f, f): the first half serves both halves of a head.
    const T* c = cos + positions[t] * table_stride;
    const T* s = sin + positions[t] * table_stride;
    rotate_heads(q + t * q_stride_token, heads, q_stride_head, half, c, s);
    rotate_heads(k + t * k_stride_token, kv_heads, k_stride_head, half, c, s);
  }
}

}  // namespace

extern "C" {

int pagedllm_cpu_rms_norm(void* out, const void* x, void* residual, const void* weight,
                          int64_t rows, int hidden, int64_t x_stride, int64_t residual_stride,
                          float eps, int dtype, int num_threads) {
  if (dtype == 0) {
    rms_norm(static_cast<float*>(out), static_cast<const float*>(x),
             static_cast<float*>(residual), static_cast<const float*>(weight), rows, hidden,
             x_stride, residual_stride, eps, num_threads);
  } else if (dtype == 1) {
    rms_norm(static_cast<uint16_t*>(out), static_cast<const uint16_t*>(x),
             static_cast<uint16_t*>(residual), static_cast<const uint16_t*>(weight), rows,
             hidden, x_stride, residual_stride, eps, num_threads);
  } else {
    return -1;
  }
  return 0;
}

int pagedllm_cpu_silu_and_mul(void* out, const void* gate_up, int64_t rows, int inter,
                              int64_t stride, int dtype, int num_threads) {
  if (dtype == 0) {
    silu_and_mul(static_cast<float*>(out), static_cast<const float*>(gate_up), rows, inter,
                 stride, num_threads);
  } else if (dtype == 1) {
    silu_and_mul(static_cast<uint16_t*>(out), static_cast<const uint16_t*>(gate_up), rows,
                 inter, stride, num_threads);
  } else {
    return -1;
  }
  return 0;
}

// Returns 0; -1 for an unsupported dtype; 1 + t when positions[t] is outside
// [0, table_rows) (nothing is rotated then).
int pagedllm_cpu_rotary(void* q, void* k, const int64_t* positions, const void* cos,
                        const void* sin, int64_t tokens, int heads, int kv_heads,
                        int head_size, int64_t q_stride_token, int64_t q_stride_head,
                        int64_t k_stride_token, int64_t k_stride_head, int64_t table_stride,
                        int64_t table_rows, int dtype, int num_threads) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (positions[t] < 0 || positions[t] >= table_rows) return static_cast<int>(1 + t);
  }
  if (dtype == 0) {
    rotary(static_cast<float*>(q), static_cast<float*>(k), positions,
           static_cast<const float*>(cos), static_cast<const float*>(sin), tokens, heads,
           kv_heads, head_size, q_stride_token, q_stride_head, k_stride_token, k_stride_head,
           table_stride, num_threads);
  } else if (dtype == 1) {
    rotary(static_cast<uint16_t*>(q), static_cast<uint16_t*>(k), positions,
           static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin), tokens,
           heads, kv_heads, head_size, q_stride_token, q_stride_head, k_stride_token,
           k_stride_head, table_stride, num_threads);
  } else {
    return -1;
  }
  return 0;
}

}  // extern "C"
