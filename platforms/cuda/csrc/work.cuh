// The preamble every attention kernel shares: which query token / sequence /
// heads a CTA serves, the part of the context it reads, and where its
// operands live (typed views of AttentionParams, cache rows through the block
// table).
//
// Decode CTAs serve head chunks: the query heads of a GQA group, kRows at a
// time (the rows of one warp's tile); chunk c of a token belongs to KV head
// c / chunks_per_group. A CTA serves `width` consecutive chunks of one token
// (width 1: one chunk, all warps on it), so its reads of one token's cache
// rows for several KV heads run side by side.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "paged_attention.h"

namespace pagedllm {

template <typename T>
struct Operands {
  const T* query;
  const T* key_cache;
  const T* value_cache;
};

template <typename T>
__device__ __forceinline__ Operands<T> operands(const AttentionParams& p) {
  return {static_cast<const T*>(p.query), static_cast<const T*>(p.key_cache),
          static_cast<const T*>(p.value_cache)};
}

template <typename T>
__device__ __forceinline__ const T* query_row(const AttentionParams& p, const T* query,
                                              int token, int head) {
  return query + token * p.query_stride_token + head * p.query_stride_head;
}

// The sequence holding query `token`: the last s with query_start_loc[s] <= token.
__device__ __forceinline__ int find_seq(const int32_t* query_start_loc, int num_seqs, int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (query_start_loc[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct QueryToken {
  int seq;
  int context_len;  // keys this query attends to: positions [0, context_len)
};

__device__ __forceinline__ QueryToken locate_token(const AttentionParams& p, int token) {
  const int seq = p.tokens_are_seqs ? token : find_seq(p.query_start_loc, p.num_seqs, token);
  const int q_start = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_start;
  // The i-th of q_len new tokens sits at seq_len - q_len + i. The min keeps
  // block-table reads inside seq_len even under a wrong max_query_len hint.
  const int seq_len = p.seq_lens[seq];
  return {seq, min(seq_len, seq_len - q_len + (token - q_start) + 1)};
}

// Element offset of (token position, kv head) in an NHD cache, or -1 when the
// position is outside [0, limit) (its block-table entry must not be read).
__device__ __forceinline__ int64_t cache_row_offset(const AttentionParams& p, int seq,
                                                    int position, int limit, int kv_head) {
  if (position >= limit) return -1;
  const int block = p.block_tables[seq * p.block_table_stride + position / p.block_size];
  const int64_t slot = static_cast<int64_t>(block) * p.block_size + position % p.block_size;
  return (slot * p.num_kv_heads + kv_head) * p.head_size;
}

struct HeadChunk {
  int kv_head, head0, num_rows;
};

template <int kRows>
__device__ __forceinline__ HeadChunk head_chunk(const AttentionParams& p, int chunk) {
  const int group = p.num_heads / p.num_kv_heads;
  const int per_group = (group + kRows - 1) / kRows;
  const int kv_head = chunk / per_group;
  const int head0 = kv_head * group + (chunk % per_group) * kRows;
  return {kv_head, head0, min(kRows, kv_head * group + group - head0)};
}

// Decode grid: x = token * ctas_per_token + the token's CTA, y = context
// partition; each CTA serves `width` (at most max_width) head chunks.
struct DecodeGrid {
  int chunks_per_token, width, ctas_per_token;
};

__host__ __device__ inline DecodeGrid decode_grid(int num_heads, int num_kv_heads, int rows,
                                                  int max_width) {
  const int group = num_heads / num_kv_heads;
  const int chunks = num_kv_heads * ((group + rows - 1) / rows);
  const int width = chunks < max_width ? chunks : max_width;
  return {chunks, width, (chunks + width - 1) / width};
}

// The work of one decode CTA: chunks [first_chunk, first_chunk + num_chunks)
// of `token` over context positions [start, end) of sequence `seq`.
struct DecodeWork {
  int token, split, seq, start, end, first_chunk, num_chunks, width;
};

// Marks an empty partition (context shorter than its start) for combine_splits.
template <int kRows>
__device__ __forceinline__ void write_empty_split(const AttentionParams& p, const DecodeWork& w) {
  if (p.num_splits == 1) return;  // only reachable with seq_len < query length
  for (int c = 0; c < w.num_chunks; ++c) {
    const HeadChunk chunk = head_chunk<kRows>(p, w.first_chunk + c);
    for (int r = threadIdx.x; r < chunk.num_rows; r += blockDim.x) {
      const int64_t row = static_cast<int64_t>(w.token) * p.num_heads + chunk.head0 + r;
      float* ml = p.partial_ml + (row * p.num_splits + w.split) * 2;
      ml[0] = -INFINITY;
      ml[1] = 0.f;
    }
  }
}

// This CTA's work; false (after marking the partition empty) when its
// partition starts past the token's context.
template <int kRows, int kMaxWidth>
__device__ __forceinline__ bool decode_work(const AttentionParams& p, DecodeWork& w) {
  const DecodeGrid grid = decode_grid(p.num_heads, p.num_kv_heads, kRows, kMaxWidth);
  w.token = blockIdx.x / grid.ctas_per_token;
  w.split = blockIdx.y;
  w.first_chunk = (blockIdx.x % grid.ctas_per_token) * grid.width;
  // One chunk per CTA needs no run-time width (fewer live registers).
  w.num_chunks = kMaxWidth == 1 ? 1 : min(grid.width, grid.chunks_per_token - w.first_chunk);
  w.width = kMaxWidth == 1 ? 1 : grid.width;
  const QueryToken qt = locate_token(p, w.token);
  w.seq = qt.seq;
  w.start = w.split * p.partition_size;
  w.end = min(qt.context_len, w.start + p.partition_size);
  if (w.start < w.end) return true;
  write_empty_split<kRows>(p, w);
  return false;
}

}  // namespace pagedllm
