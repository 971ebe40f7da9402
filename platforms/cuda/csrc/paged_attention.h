// Host-side interface of the PagedAttention kernels: plain pointers and sizes,
// no ATen, so the .cu files compile with nvcc alone (CI compile check) and
// binding.cpp is the only translation unit that sees torch.
//
// Layouts (element strides unless noted):
//   query        [num_tokens, num_heads, head_size], last dim contiguous
//   key/value    [num_tokens, num_kv_heads, head_size], last dim contiguous
//   key/value cache (NHD) [num_blocks, block_size, num_kv_heads, head_size], contiguous
//   block_tables [num_seqs, block_table_stride] int32
//   seq_lens     [num_seqs] int32, query_start_loc [num_seqs + 1] int32
//   slot_mapping [num_tokens] int64, -1 = skip
//   out          [num_tokens, num_heads, head_size], contiguous
//   partial_out  [num_tokens, num_heads, num_splits, head_size] float32
//   partial_ml   [num_tokens, num_heads, num_splits, 2] float32 (running max in
//                log2 units, softmax denominator; denominator 0 = empty split)
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

namespace pagedllm {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct WriteKvParams {
  const void* key;
  const void* value;
  void* key_cache;
  void* value_cache;
  const int64_t* slot_mapping;
  int64_t key_stride_token, key_stride_head;
  int64_t value_stride_token, value_stride_head;
  int num_tokens, num_kv_heads, head_size, element_size;
};

struct AttentionParams {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
  float* partial_out;
  float* partial_ml;
  int64_t query_stride_token, query_stride_head;
  int64_t block_table_stride;
  int num_tokens, num_seqs, num_heads, num_kv_heads, head_size, block_size;
  // Split-K over the context: a query token's keys are cut into partitions of
  // partition_size tokens, one CTA each; num_splits == 1 writes `out` directly.
  int partition_size, num_splits;
  // True when token i belongs to sequence i (every sequence has one query).
  bool tokens_are_seqs;
  float scale;
};

// Each launcher returns the launch's error (cudaSuccess when fine).
cudaError_t launch_write_kv(const WriteKvParams& params, cudaStream_t stream);

// One query token per CTA (split-K over the context, then a combine pass
// when num_splits > 1): decode and the generic fallback. With
// use_tensor_cores (fp16/bf16 on sm80+) the GQA group goes through mma.sync.
cudaError_t launch_decode(DType dtype, const AttentionParams& params, bool use_tensor_cores,
                          cudaStream_t stream);

// Tiled multi-token attention (prefill / chunked prefill), fp16/bf16 on sm80+.
cudaError_t launch_prefill(DType dtype, const AttentionParams& params, int max_query_len,
                           cudaStream_t stream);

}  // namespace pagedllm
