// Tiled multi-token paged attention (prefill, chunked prefill, mixed batches)
// on tensor cores, fp16/bf16, sm80+, in the FlashAttention-2 style.
//
// One CTA = (64-row query tile, sequence, KV head). The GQA group is packed
// into the rows: row r of a sequence's (query, head) space is query
// r / group, head kv_head * group + r % group, so K/V tiles are read once per
// group. Each of the 4 warps owns 16 rows; 64-key K/V tiles are gathered
// from the paged cache with cp.async (keys at or past the CTA's last causal
// position are zero-filled, never read) and the V load of a tile overlaps the
// Q K^T of the same tile, the next K load overlaps P V.
//
// Shared memory (elements of T, rows padded by 8): q, k, v [64][HEAD + 8].
#pragma once

#include "common.cuh"
#include "work.cuh"

namespace pagedllm {

template <int HEAD>
struct PrefillShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRowsM = 64;  // query rows per CTA
  static constexpr int kKeysN = 64;  // keys per tile
  static constexpr int kRow = HEAD + 8;
  static constexpr int kChunks = HEAD / 8;
  static constexpr size_t kSmemBytes = 3 * 64 * kRow * 2;
  // Q's A fragments stay in registers up to HEAD 128 (saves a fifth of the
  // ldmatrix traffic); at 256 they would push the kernel into spills.
  static constexpr int kQFragments = HEAD <= 128 ? HEAD / 16 : 1;
  // 3 CTAs per SM (170 registers a thread) keep another CTA's math running
  // while one waits on its K/V tile.
  static constexpr int kMinBlocks = HEAD <= 128 ? 3 : 1;
  static_assert(HEAD % 16 == 0, "head size must be a multiple of 16");
};

// 64 rows x HEAD: thread t copies row t / 2, chunks t % 2, +2, ...
template <typename T, int HEAD>
__device__ __forceinline__ void load_rows_async(T* dst, const T* src, bool valid) {
  using S = PrefillShape<HEAD>;
  T* row = dst + (threadIdx.x >> 1) * S::kRow;
#pragma unroll
  for (int i = 0; i < S::kChunks / 2; ++i) {
    const int c = 2 * i + (threadIdx.x & 1);
    cp_async_16(row + c * 8, src + c * 8, valid);
  }
}

template <typename T, int HEAD>
__device__ __forceinline__ void load_kv_tile(const AttentionParams& p, const T* cache, T* dst,
                                             int seq, int key0, int kv_end, int kv_head) {
  const int64_t offset = cache_row_offset(p, seq, key0 + (threadIdx.x >> 1), kv_end, kv_head);
  load_rows_async<T, HEAD>(dst, cache + (offset >= 0 ? offset : 0), offset >= 0);
}

// Scores of one warp's 16 rows against a 64-key tile, masked and in log2 units.
template <typename T, int HEAD>
__device__ __forceinline__ void tile_scores(
    const T* q_rows, const uint32_t (&q_frag)[PrefillShape<HEAD>::kQFragments][4],
    const T* k_smem, int lane, int key0, const int (&row_pos)[2], float scale_log2,
    float (&s)[8][4]) {
  using S = PrefillShape<HEAD>;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < HEAD / 16; ++ks) {
    uint32_t a[4];
    if constexpr (S::kQFragments == HEAD / 16) {
      a[0] = q_frag[ks][0], a[1] = q_frag[ks][1], a[2] = q_frag[ks][2], a[3] = q_frag[ks][3];
    } else {
      ldmatrix_x4<false>(a, q_rows + a_frag_row(lane) * S::kRow + ks * 16 + a_frag_col(lane));
    }
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldmatrix_x4<false>(b, k_smem + (np * 16 + b_frag_row(lane)) * S::kRow + ks * 16 +
                                b_frag_col(lane));
      mma_16816<T>(s[2 * np], a, b[0], b[1]);
      mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = key0 + nt * 8 + (lane & 3) * 2 + (i & 1);
      s[nt][i] = key <= row_pos[i >> 1] ? s[nt][i] * scale_log2 : -INFINITY;
    }
  }
}

// Online-softmax update of rows (g, g + 8); turns s into probabilities.
__device__ __forceinline__ void softmax_update(float (&s)[8][4], float (&m)[2], float (&l)[2],
                                               float (&alpha)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float m_new = fmaxf(m[r], tile_max);
    // A row with no visible key yet keeps m = -inf; subtract 0 to avoid NaN.
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    alpha[r] = exp2f(m[r] - m_use);
    m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
      s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    l[r] = l[r] * alpha[r] + sum;
  }
}

template <typename T, int HEAD>
__global__ void __launch_bounds__(PrefillShape<HEAD>::kThreads, PrefillShape<HEAD>::kMinBlocks)
    prefill_mma_kernel(AttentionParams p) {
  using S = PrefillShape<HEAD>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* k_smem = q_smem + S::kRowsM * S::kRow;
  T* v_smem = k_smem + S::kKeysN * S::kRow;

  const int seq = blockIdx.y, kv_head = blockIdx.z;
  const int group = p.num_heads / p.num_kv_heads;
  const int q_start = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_start;
  const int num_rows = q_len * group;
  // Longest causal rows first: their CTAs start early and finish with the rest.
  const int row0 = (gridDim.x - 1 - blockIdx.x) * S::kRowsM;
  if (row0 >= num_rows) return;
  const int context0 = p.seq_lens[seq] - q_len;  // position of the first new token
  const int kv_end = context0 + (min(num_rows, row0 + S::kRowsM) - 1) / group + 1;

  const Operands<T> ops = operands<T>(p);
  {  // Q rows (zero past the sequence's queries)
    const int r = row0 + (threadIdx.x >> 1);
    const T* src = query_row(p, ops.query, q_start + r / group, kv_head * group + r % group);
    load_rows_async<T, HEAD>(q_smem, r < num_rows ? src : ops.query, r < num_rows);
  }
  load_kv_tile<T, HEAD>(p, ops.key_cache, k_smem, seq, 0, kv_end, kv_head);
  cp_async_commit();

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  int row_pos[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + warp * 16 + (lane >> 2) + r * 8;
    row_pos[r] = row < num_rows ? context0 + row / group : kv_end - 1;
  }
  const float scale_log2 = p.scale * kLog2e;
  float o[HEAD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int num_tiles = (kv_end + S::kKeysN - 1) / S::kKeysN;
  const T* q_rows = q_smem + warp * 16 * S::kRow;
  cp_async_wait<0>();
  __syncthreads();  // Q and the first K tile landed
  uint32_t q_frag[S::kQFragments][4];
  if constexpr (S::kQFragments == HEAD / 16) {
#pragma unroll
    for (int ks = 0; ks < HEAD / 16; ++ks) {
      ldmatrix_x4<false>(q_frag[ks],
                         q_rows + a_frag_row(lane) * S::kRow + ks * 16 + a_frag_col(lane));
    }
  }
  for (int tile = 0; tile < num_tiles; ++tile) {
    if (tile > 0) {
      cp_async_wait<0>();
      __syncthreads();  // K tile landed; every warp is done with the previous V
    }
    load_kv_tile<T, HEAD>(p, ops.value_cache, v_smem, seq, tile * S::kKeysN, kv_end, kv_head);
    cp_async_commit();
    float s[8][4], alpha[2];
    tile_scores<T, HEAD>(q_rows, q_frag, k_smem, lane, tile * S::kKeysN, row_pos, scale_log2, s);
    softmax_update(s, m, l, alpha);
    rescale_rows<HEAD>(o, alpha);
    cp_async_wait<0>();
    __syncthreads();  // V tile landed; every warp is done with this K
    if (tile + 1 < num_tiles) {
      load_kv_tile<T, HEAD>(p, ops.key_cache, k_smem, seq, (tile + 1) * S::kKeysN, kv_end, kv_head);
      cp_async_commit();
    }
    accumulate_pv<T, HEAD, 8, S::kRow>(s, v_smem, lane, o);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = row0 + warp * 16 + (lane >> 2) + r * 8;
    if (row >= num_rows) continue;
    const float inv = 1.f / l[r];
    T* out = static_cast<T*>(p.out) +
             (static_cast<int64_t>(q_start + row / group) * p.num_heads + kv_head * group +
              row % group) * HEAD + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < HEAD / 8; ++n) {
      *reinterpret_cast<uint32_t*>(out + n * 8) =
          Convert<T>::pack2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
  }
}

}  // namespace pagedllm
