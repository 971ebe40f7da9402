// reshape_and_cache: scatter the new tokens' K/V into the NHD paged cache.
// A pure 16-byte copy (the cache has the input's dtype), one CTA per token.
#include <cuda_runtime.h>

#include <cstdint>

#include "paged_attention.h"

namespace pagedllm {
namespace {

__global__ void write_kv_kernel(WriteKvParams p) {
  const int token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0) return;
  const int row_chunks = p.head_size * p.element_size / 16;
  const int64_t cache_row = slot * p.num_kv_heads * row_chunks;
  const char* key = static_cast<const char*>(p.key);
  const char* value = static_cast<const char*>(p.value);
  uint4* key_cache = static_cast<uint4*>(p.key_cache);
  uint4* value_cache = static_cast<uint4*>(p.value_cache);
  for (int c = threadIdx.x; c < p.num_kv_heads * row_chunks; c += blockDim.x) {
    const int head = c / row_chunks, chunk = c % row_chunks;
    const int64_t k_src = (token * p.key_stride_token + head * p.key_stride_head) * p.element_size;
    const int64_t v_src =
        (token * p.value_stride_token + head * p.value_stride_head) * p.element_size;
    key_cache[cache_row + c] = reinterpret_cast<const uint4*>(key + k_src)[chunk];
    value_cache[cache_row + c] = reinterpret_cast<const uint4*>(value + v_src)[chunk];
  }
}

}  // namespace

cudaError_t launch_write_kv(const WriteKvParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) return cudaSuccess;
  write_kv_kernel<<<params.num_tokens, 128, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace pagedllm
