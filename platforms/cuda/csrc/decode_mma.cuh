// Split-K paged decode on tensor cores (fp16/bf16, sm80+).
//
// One CTA = (query token, KV head, chunk of up to 16 query heads of its GQA
// group, context partition); decode_cta has the grid. The group's query
// heads are the 16 rows of an m16n8k16 A operand, so each K/V byte is read
// once for all of them. Each of the 4 warps streams its own 16-token tiles
// (tile i goes to warp i % 4) through a private cp.async ring and
// keeps its own online softmax; the warps are merged once at the end
// (finish_partition), and partitions by combine_splits. Tokens past the
// partition end are zero-filled, never read.
//
// Shared memory (elements of T, rows padded by 8 so ldmatrix is conflict-free):
//   q    [16][HEAD + 8]
//   ring [4 warps][kStages][K, V][16 tokens][HEAD + 8]
// and, after the main loop, reused as the float epilogue buffers.
#pragma once

#include "common.cuh"

namespace pagedllm {

template <int HEAD>
struct DecodeMmaShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kTile = 16;                 // tokens per warp tile
  static constexpr int kRow = HEAD + 8;            // padded smem row (elements)
  static constexpr int kChunks = HEAD / 8;         // 16-byte chunks per row
  static constexpr int kStageElems = 2 * kTile * kRow;  // K and V of one tile
  // cp.async ring depth per warp: tiles in flight while one is consumed.
  static constexpr int kStages = 2;
  static constexpr int kRingElems = kWarps * kStages * kStageElems;
  static constexpr size_t kSmemBytes = (16 * kRow + kRingElems) * 2;
  static_assert(HEAD % 16 == 0, "head size must be a multiple of 16 (even chunk count)");
  static_assert(kWarps * 16 * (HEAD + 2) * 4 <= kRingElems * 2, "epilogue must fit the ring");
};

// Issues one warp's cp.async loads for a 16-token tile: chunk i * 32 + lane
// of the tile's [16 rows][HEAD / 8 chunks], so each instruction reads whole
// rows. Lane r (< 16) holds row r's cache offset (-1 = masked).
template <typename T, int HEAD>
__device__ __forceinline__ void load_tile_async(const AttentionParams& p, T* stage,
                                                int64_t row_offset, int lane) {
  using S = DecodeMmaShape<HEAD>;
  const T* k_cache = static_cast<const T*>(p.key_cache);
  const T* v_cache = static_cast<const T*>(p.value_cache);
#pragma unroll
  for (int i = 0; i < S::kTile * S::kChunks / kWarpSize; ++i) {
    const int c = i * kWarpSize + lane;
    const int row = c / S::kChunks, chunk = c % S::kChunks;
    const int64_t offset = __shfl_sync(0xffffffffu, row_offset, row);
    const int64_t src = (offset >= 0 ? offset : 0) + chunk * 8;
    T* k_dst = stage + row * S::kRow + chunk * 8;
    cp_async_16(k_dst, k_cache + src, offset >= 0);
    cp_async_16(k_dst + S::kTile * S::kRow, v_cache + src, offset >= 0);
  }
}

// One warp's work on a landed tile: S = Q K^T, online softmax, O += P V.
template <typename T, int HEAD>
__device__ __forceinline__ void attend_tile(const T* q_smem, const T* stage, int lane,
                                            int valid_tokens, float scale_log2,
                                            float (&o)[HEAD / 8][4], float (&m)[2],
                                            float (&l)[2]) {
  using S = DecodeMmaShape<HEAD>;
  const T* k_smem = stage;
  const T* v_smem = stage + S::kTile * S::kRow;
  float s[2][4] = {};
#pragma unroll
  for (int ks = 0; ks < HEAD / 16; ++ks) {
    uint32_t a[4], b[4];
    ldmatrix_x4<false>(a, q_smem + a_frag_row(lane) * S::kRow + ks * 16 + a_frag_col(lane));
    ldmatrix_x4<false>(b, k_smem + b_frag_row(lane) * S::kRow + ks * 16 + b_frag_col(lane));
    mma_16816<T>(s[0], a, b[0], b[1]);
    mma_16816<T>(s[1], a, b[2], b[3]);
  }
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int token = nt * 8 + (lane & 3) * 2 + (i & 1);
      s[nt][i] = token < valid_tokens ? s[nt][i] * scale_log2 : -INFINITY;
      tile_max[i >> 1] = fmaxf(tile_max[i >> 1], s[nt][i]);
    }
  }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
    const float m_new = fmaxf(m[r], tile_max[r]);  // finite: the tile has a valid token
    alpha[r] = exp2f(m[r] - m_new);
    m[r] = m_new;
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[nt][i] = exp2f(s[nt][i] - m[i >> 1]);
      l[i >> 1] += s[nt][i];
    }
  }
#pragma unroll
  for (int n = 0; n < HEAD / 8; ++n) {
    o[n][0] *= alpha[0];
    o[n][1] *= alpha[0];
    o[n][2] *= alpha[1];
    o[n][3] *= alpha[1];
  }
  // The two score accumulators are exactly the A fragment of P (k = tokens).
  const uint32_t pa[4] = {Convert<T>::pack2(s[0][0], s[0][1]), Convert<T>::pack2(s[0][2], s[0][3]),
                          Convert<T>::pack2(s[1][0], s[1][1]), Convert<T>::pack2(s[1][2], s[1][3])};
#pragma unroll
  for (int dp = 0; dp < HEAD / 16; ++dp) {
    uint32_t b[4];
    ldmatrix_x4<true>(b, v_smem + a_frag_row(lane) * S::kRow + dp * 16 + a_frag_col(lane));
    mma_16816<T>(o[2 * dp], pa, b[0], b[1]);
    mma_16816<T>(o[2 * dp + 1], pa, b[2], b[3]);
  }
}

// One warp's pass over its tiles of [start, end): a ring of kStages tiles in
// flight, the block-table lookup of the next tile issued a tile early. On
// return the warp's (o, m, l) hold its online-softmax state, l summed over
// the quad, and no cp.async is pending.
template <typename T, int HEAD>
__device__ __forceinline__ void stream_tiles(const AttentionParams& p, const T* q_smem, T* ring,
                                             int seq, int kv_head, int start, int end, int warp,
                                             int lane, float (&o)[HEAD / 8][4], float (&m)[2],
                                             float (&l)[2]) {
  using S = DecodeMmaShape<HEAD>;
  const int num_tiles = (end - start + S::kTile - 1) / S::kTile;
  auto row_offset = [&](int tile) {
    return cache_row_offset(p, seq, start + tile * S::kTile + (lane & 15), end, kv_head);
  };
#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    const int tile = warp + s * S::kWarps;
    if (tile < num_tiles) {
      load_tile_async<T, HEAD>(p, ring + s * S::kStageElems, row_offset(tile), lane);
    }
    cp_async_commit();
  }
  constexpr int kAhead = (S::kStages - 1) * S::kWarps;
  int64_t next_offset = row_offset(warp + kAhead);
  const float scale_log2 = p.scale * kLog2e;
  int stage = 0;
  for (int tile = warp; tile < num_tiles; tile += S::kWarps) {
    if (tile + kAhead < num_tiles) {
      const int free_stage = stage == 0 ? S::kStages - 1 : stage - 1;  // consumed last round
      load_tile_async<T, HEAD>(p, ring + free_stage * S::kStageElems, next_offset, lane);
    }
    cp_async_commit();
    next_offset = row_offset(tile + kAhead + S::kWarps);  // latency hides behind the wait
    cp_async_wait<S::kStages - 1>();
    __syncwarp();
    attend_tile<T, HEAD>(q_smem, ring + stage * S::kStageElems, lane,
                         end - (start + tile * S::kTile), scale_log2, o, m, l);
    __syncwarp();
    stage = stage + 1 == S::kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
}

template <typename T, int HEAD>
__global__ void __launch_bounds__(DecodeMmaShape<HEAD>::kThreads)
    decode_mma_kernel(AttentionParams p) {
  using S = DecodeMmaShape<HEAD>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* ring = q_smem + 16 * S::kRow;

  const DecodeCta cta = decode_cta<16>(p);
  const int token = cta.token, split = cta.split, kv_head = cta.kv_head;
  const int head0 = cta.head0, num_rows = cta.num_rows;
  const QueryToken qt = locate_token(p, token);
  const int start = split * p.partition_size;
  const int end = min(qt.context_len, start + p.partition_size);
  if (start >= end) {
    write_empty_split(p, token, head0, num_rows, split);
    return;
  }

  const T* query = static_cast<const T*>(p.query) + token * p.query_stride_token;
  for (int c = threadIdx.x; c < 16 * S::kChunks; c += S::kThreads) {
    const int r = c / S::kChunks, chunk = c % S::kChunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < num_rows) {
      v = reinterpret_cast<const uint4*>(query + (head0 + r) * p.query_stride_head)[chunk];
    }
    *reinterpret_cast<uint4*>(q_smem + r * S::kRow + chunk * 8) = v;
  }
  __syncthreads();

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float o[HEAD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  stream_tiles<T, HEAD>(p, q_smem, ring + warp * S::kStages * S::kStageElems, qt.seq, kv_head,
                        start, end, warp, lane, o, m, l);
  __syncthreads();  // every warp is done with the ring: reuse it for the epilogue

  float* o_smem = reinterpret_cast<float*>(ring);
  float* ml_smem = o_smem + S::kWarps * 16 * HEAD;
  const int g = lane >> 2, q2 = (lane & 3) * 2;
#pragma unroll
  for (int n = 0; n < HEAD / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o_smem[(warp * 16 + g + (i >> 1) * 8) * HEAD + n * 8 + q2 + (i & 1)] = o[n][i];
    }
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      ml_smem[(warp * 16 + g + r * 8) * 2] = m[r];
      ml_smem[(warp * 16 + g + r * 8) * 2 + 1] = l[r];
    }
  }
  __syncthreads();
  finish_partition<T, HEAD, S::kWarps, 16>(p, o_smem, ml_smem, token, head0, num_rows, split);
}

}  // namespace pagedllm
