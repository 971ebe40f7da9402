// Split-K paged decode on tensor cores (fp16/bf16, sm80+).
//
// A CTA serves `width` head chunks of one query token over one context
// partition (work.cuh has the grid): each chunk is up to 16 query heads of a
// GQA group, the 16 rows of an m16n8k16 A operand, so each K/V byte is read
// once for all of them. Warp s * width + c streams chunk c's kTile-token tiles
// s, s + streams, ... (streams = kWarps / width) through a private cp.async
// ring of kStages tiles and keeps its own online softmax; the streams of a
// chunk are merged at the end (finish_partition), partitions by
// combine_splits. Tokens past the partition end are zero-filled, never read.
//
// The launch shape (DecodeMmaShape) is a template so that
// benchmarks/decode_variants.py can time alternatives against the one
// attention_impl.cuh launches (DecodeMmaFor).
//
// Shared memory (elements of T, rows padded by 8 so ldmatrix is conflict-free):
//   q    [width][16][HEAD + 8]  (only when Q does not stay in registers)
//   ring [kWarps][kStages][K, V][kTile tokens][HEAD + 8]
// and, after the main loop, reused as the float epilogue buffers.
#pragma once

#include "common.cuh"
#include "work.cuh"

namespace pagedllm {

// kTile: tokens per warp tile (16 or 32); kStages: cp.async ring depth per
// warp; kWarps: warps per CTA; kMaxWidth: head chunks per CTA at most (> 1
// puts the KV heads of one token's cache rows in one CTA); kL2Prefetch: L2
// prefetch size of each cp.async (0, 128 or 256 bytes); kQInRegisters: keep
// Q's A fragments in registers instead of reloading them from smem per tile.
template <int HEAD, int kTile_, int kStages_, int kWarps_, int kMaxWidth_, int kL2Prefetch_,
          bool kQInRegisters_>
struct DecodeMmaShape {
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kTile = kTile_;
  static constexpr int kStages = kStages_;
  static constexpr int kMaxWidth = kMaxWidth_;
  static constexpr int kL2Prefetch = kL2Prefetch_;
  static constexpr int kRow = HEAD + 8;         // padded smem row (elements)
  static constexpr int kChunks = HEAD / 8;      // 16-byte chunks per row
  static constexpr int kStageElems = 2 * kTile * kRow;  // K and V of one tile
  static constexpr int kQFragments = kQInRegisters_ ? HEAD / 16 : 0;
  static constexpr int kQElems = kQFragments ? 0 : kMaxWidth * 16 * kRow;
  static constexpr int kRingElems = kWarps * kStages * kStageElems;
  static constexpr size_t kSmemBytes = (kQElems + kRingElems) * 2;
  static_assert(HEAD % 16 == 0, "head size must be a multiple of 16 (even chunk count)");
  static_assert(kTile % 16 == 0 && kTile <= kWarpSize, "a tile is 1-2 m16 blocks of tokens");
  static_assert(kWarps % kMaxWidth == 0, "every chunk gets the same number of warps");
  static_assert(kWarps * 16 * (HEAD + 2) * 4 <= kSmemBytes, "epilogue must fit the smem");
};

// The query rows of one warp's chunk as m16n8k16 A operands: fragments in
// registers, or ldmatrix from the chunk's rows staged in smem.
template <typename T, typename S>
struct QueryOperand {
  uint32_t frag[S::kQFragments ? S::kQFragments : 1][4];
  const T* smem;

  __device__ __forceinline__ void get(int ks, int lane, uint32_t (&a)[4]) const {
    if constexpr (S::kQFragments) {
      a[0] = frag[ks][0], a[1] = frag[ks][1], a[2] = frag[ks][2], a[3] = frag[ks][3];
    } else {
      ldmatrix_x4<false>(a, smem + a_frag_row(lane) * S::kRow + ks * 16 + a_frag_col(lane));
    }
  }
};

// Loads the A fragments of rows [0, num_rows) of `rows` (row r at rows + r *
// stride; zeros past num_rows) straight from global memory.
template <typename T, typename S>
__device__ __forceinline__ void load_query_fragments(QueryOperand<T, S>& q, const T* rows,
                                                     int64_t stride, int num_rows, int lane) {
  const int g = lane >> 2, q2 = (lane & 3) * 2;
#pragma unroll
  for (int ks = 0; ks < S::kQFragments; ++ks) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = g + (i & 1) * 8, col = ks * 16 + (i >> 1) * 8 + q2;
      q.frag[ks][i] = r < num_rows ? *reinterpret_cast<const uint32_t*>(rows + r * stride + col)
                                   : 0u;
    }
  }
}

// Stages the query rows of the CTA's chunks in smem ([width][16][kRow], zero
// rows past each chunk's heads). Every thread; a __syncthreads must follow.
template <typename T, typename S>
__device__ void stage_query_rows(const AttentionParams& p, const DecodeWork& w, T* q_smem) {
  const T* query = operands<T>(p).query;
  for (int c = 0; c < w.num_chunks; ++c) {
    const HeadChunk chunk = head_chunk<16>(p, w.first_chunk + c);
    for (int i = threadIdx.x; i < 16 * S::kChunks; i += S::kThreads) {
      const int r = i / S::kChunks, col = i % S::kChunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < chunk.num_rows) {
        v = reinterpret_cast<const uint4*>(query_row(p, query, w.token, chunk.head0 + r))[col];
      }
      *reinterpret_cast<uint4*>(q_smem + (c * 16 + r) * S::kRow + col * 8) = v;
    }
  }
}

// Issues one warp's cp.async loads for a kTile-token tile: chunk i * 32 +
// lane of the tile's [kTile rows][HEAD / 8 chunks], so each instruction reads
// whole rows. Lane r holds row r % kTile's cache offset (-1 = masked).
template <typename T, typename S>
__device__ __forceinline__ void load_tile_async(const Operands<T>& ops, T* stage,
                                                int64_t row_offset, int lane) {
#pragma unroll
  for (int i = 0; i < S::kTile * S::kChunks / kWarpSize; ++i) {
    const int c = i * kWarpSize + lane;
    const int row = c / S::kChunks, chunk = c % S::kChunks;
    const int64_t offset = __shfl_sync(0xffffffffu, row_offset, row);
    const int64_t src = (offset >= 0 ? offset : 0) + chunk * 8;
    T* k_dst = stage + row * S::kRow + chunk * 8;
    cp_async_16<S::kL2Prefetch>(k_dst, ops.key_cache + src, offset >= 0);
    cp_async_16<S::kL2Prefetch>(k_dst + S::kTile * S::kRow, ops.value_cache + src, offset >= 0);
  }
}

// One warp's work on a landed tile: S = Q K^T, online softmax, O += P V.
template <typename T, int HEAD, typename S>
__device__ __forceinline__ void attend_tile(const QueryOperand<T, S>& q, const T* stage,
                                            int lane, int valid_tokens, float scale_log2,
                                            float (&o)[HEAD / 8][4], float (&m)[2],
                                            float (&l)[2]) {
  constexpr int kN8 = S::kTile / 8;  // n8 score tiles (tokens)
  const T* k_smem = stage;
  const T* v_smem = stage + S::kTile * S::kRow;
  float s[kN8][4] = {};
#pragma unroll
  for (int ks = 0; ks < HEAD / 16; ++ks) {
    uint32_t a[4];
    q.get(ks, lane, a);
#pragma unroll
    for (int np = 0; np < kN8 / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4<false>(b, k_smem + (np * 16 + b_frag_row(lane)) * S::kRow + ks * 16 +
                                b_frag_col(lane));
      mma_16816<T>(s[2 * np], a, b[0], b[1]);
      mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
    }
  }
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < kN8; ++nt) {
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
  for (int nt = 0; nt < kN8; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[nt][i] = exp2f(s[nt][i] - m[i >> 1]);
      l[i >> 1] += s[nt][i];
    }
  }
  rescale_rows<HEAD>(o, alpha);
  accumulate_pv<T, HEAD, kN8, S::kRow>(s, v_smem, lane, o);
}

// One warp's pass over tiles stream, stream + streams, ... of [w.start,
// w.end): a ring of kStages tiles in flight, the block-table lookup of the
// next tile issued a tile early. On return (o, m, l) hold the warp's online-
// softmax state, l summed over the quad, and no cp.async is pending.
template <typename T, int HEAD, typename S>
__device__ __forceinline__ void stream_tiles(const AttentionParams& p, const DecodeWork& w,
                                             const QueryOperand<T, S>& q, T* ring, int kv_head,
                                             int stream, int streams, int lane,
                                             float (&o)[HEAD / 8][4], float (&m)[2],
                                             float (&l)[2]) {
  const Operands<T> ops = operands<T>(p);
  const int num_tiles = (w.end - w.start + S::kTile - 1) / S::kTile;
  auto row_offset = [&](int tile) {
    return cache_row_offset(p, w.seq, w.start + tile * S::kTile + lane % S::kTile, w.end,
                            kv_head);
  };
#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    const int tile = stream + s * streams;
    if (tile < num_tiles) {
      load_tile_async<T, S>(ops, ring + s * S::kStageElems, row_offset(tile), lane);
    }
    cp_async_commit();
  }
  const int ahead = (S::kStages - 1) * streams;
  int64_t next_offset = row_offset(stream + ahead);
  const float scale_log2 = p.scale * kLog2e;
  int stage = 0;
  for (int tile = stream; tile < num_tiles; tile += streams) {
    if (tile + ahead < num_tiles) {
      const int free_stage = stage == 0 ? S::kStages - 1 : stage - 1;  // consumed last round
      load_tile_async<T, S>(ops, ring + free_stage * S::kStageElems, next_offset, lane);
    }
    cp_async_commit();
    next_offset = row_offset(tile + ahead + streams);  // latency hides behind the wait
    cp_async_wait<S::kStages - 1>();
    __syncwarp();
    attend_tile<T, HEAD, S>(q, ring + stage * S::kStageElems, lane,
                            w.end - (w.start + tile * S::kTile), scale_log2, o, m, l);
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

template <typename T, int HEAD, typename S>
__global__ void __launch_bounds__(S::kThreads) decode_mma_kernel(AttentionParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* ring = q_smem + S::kQElems;

  DecodeWork w;
  if (!decode_work<16, S::kMaxWidth>(p, w)) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int c = warp % w.width, stream = warp / w.width, streams = S::kWarps / w.width;
  const bool active = c < w.num_chunks && stream < streams;
  const HeadChunk chunk = head_chunk<16>(p, w.first_chunk + min(c, w.num_chunks - 1));

  QueryOperand<T, S> q;
  if constexpr (S::kQFragments) {
    load_query_fragments<T, S>(q, query_row(p, operands<T>(p).query, w.token, chunk.head0),
                               p.query_stride_head, chunk.num_rows, lane);
  } else {
    stage_query_rows<T, S>(p, w, q_smem);
    q.smem = q_smem + c * 16 * S::kRow;
    __syncthreads();
  }

  float o[HEAD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  if (active) {
    stream_tiles<T, HEAD, S>(p, w, q, ring + warp * S::kStages * S::kStageElems, chunk.kv_head,
                             stream, streams, lane, o, m, l);
  }
  __syncthreads();  // every warp is done with the ring: reuse it for the epilogue

  float* o_smem = reinterpret_cast<float*>(smem_raw);
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
  finish_partition<T, HEAD, S::kWarps, 16, S::kMaxWidth>(p, o_smem, ml_smem, w);
}

}  // namespace pagedllm
