// Thin torch binding: unpacks tensors into the plain-pointer params of
// paged_attention.h and launches on the current stream. Shapes, dtypes and
// alignment are validated in Python (platforms/cuda/backend.py) with
// ValueErrors naming the field; the checks here only guard memory safety.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "paged_attention.h"

namespace {

using pagedllm::AttentionParams;
using pagedllm::DType;

DType to_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", type);
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
              at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64");
  const c10::cuda::CUDAGuard guard(key.device());
  pagedllm::WriteKvParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.key_stride_token = key.stride(0);
  p.key_stride_head = key.stride(1);
  p.value_stride_token = value.stride(0);
  p.value_stride_head = value.stride(1);
  p.num_tokens = static_cast<int>(key.size(0));
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.head_size = static_cast<int>(key.size(2));
  p.element_size = static_cast<int>(key.element_size());
  check_launch(pagedllm::launch_write_kv(p, c10::cuda::getCurrentCUDAStream()), "write_kv");
}

AttentionParams make_params(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                            double scale) {
  TORCH_CHECK(out.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "out and caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt,
              "block_tables, seq_lens and query_start_loc must be int32");
  TORCH_CHECK(block_tables.stride(1) == 1 && seq_lens.is_contiguous() &&
                  query_start_loc.is_contiguous(),
              "index tensors must be contiguous");
  AttentionParams p{};
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.query_stride_token = query.stride(0);
  p.query_stride_head = query.stride(1);
  p.block_table_stride = block_tables.stride(0);
  p.num_tokens = static_cast<int>(query.size(0));
  p.num_seqs = static_cast<int>(seq_lens.size(0));
  p.num_heads = static_cast<int>(query.size(1));
  p.num_kv_heads = static_cast<int>(key_cache.size(2));
  p.head_size = static_cast<int>(query.size(2));
  p.block_size = static_cast<int>(key_cache.size(1));
  p.partition_size = 1;
  p.num_splits = 1;
  p.scale = static_cast<float>(scale);
  return p;
}

void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
            const at::Tensor& value_cache, const at::Tensor& block_tables,
            const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale,
            int64_t partition_size, int64_t num_splits, bool tokens_are_seqs,
            bool use_tensor_cores) {
  const c10::cuda::CUDAGuard guard(query.device());
  AttentionParams p = make_params(out, query, key_cache, value_cache, block_tables, seq_lens,
                                  query_start_loc, scale);
  p.partition_size = static_cast<int>(partition_size);
  p.num_splits = static_cast<int>(num_splits);
  p.tokens_are_seqs = tokens_are_seqs;
  at::Tensor partial_out, partial_ml;
  if (num_splits > 1) {
    const auto options = query.options().dtype(at::kFloat);
    partial_out = at::empty({p.num_tokens, p.num_heads, num_splits, p.head_size}, options);
    partial_ml = at::empty({p.num_tokens, p.num_heads, num_splits, 2}, options);
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_ml = partial_ml.data_ptr<float>();
  }
  check_launch(pagedllm::launch_decode(to_dtype(query.scalar_type()), p, use_tensor_cores,
                                       c10::cuda::getCurrentCUDAStream()),
               "paged decode");
}

void prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
             const at::Tensor& value_cache, const at::Tensor& block_tables,
             const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale,
             int64_t max_query_len) {
  const c10::cuda::CUDAGuard guard(query.device());
  const AttentionParams p = make_params(out, query, key_cache, value_cache, block_tables,
                                        seq_lens, query_start_loc, scale);
  check_launch(pagedllm::launch_prefill(to_dtype(query.scalar_type()), p,
                                        static_cast<int>(max_query_len),
                                        c10::cuda::getCurrentCUDAStream()),
               "paged prefill");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pagedllm PagedAttention CUDA kernels";
  m.def("write_kv", &write_kv, "scatter key/value into the NHD paged cache");
  m.def("decode", &decode, "split-K paged attention, one query token per CTA");
  m.def("prefill", &prefill, "tiled multi-token paged attention (fp16/bf16, sm80+)");
}
