// dtype dispatch for the attention launchers declared in paged_attention.h;
// the per-dtype bodies are compiled in attention_{fp16,bf16,fp32}.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "paged_attention.h"

namespace pagedllm {

template <typename T>
cudaError_t run_decode(const AttentionParams& p, bool use_tensor_cores, cudaStream_t stream);
template <typename T>
cudaError_t run_prefill(const AttentionParams& p, int max_query_len, cudaStream_t stream);

extern template cudaError_t run_decode<float>(const AttentionParams&, bool, cudaStream_t);
extern template cudaError_t run_decode<__half>(const AttentionParams&, bool, cudaStream_t);
extern template cudaError_t run_decode<__nv_bfloat16>(const AttentionParams&, bool, cudaStream_t);
extern template cudaError_t run_prefill<float>(const AttentionParams&, int, cudaStream_t);
extern template cudaError_t run_prefill<__half>(const AttentionParams&, int, cudaStream_t);
extern template cudaError_t run_prefill<__nv_bfloat16>(const AttentionParams&, int, cudaStream_t);

cudaError_t launch_decode(DType dtype, const AttentionParams& params, bool use_tensor_cores,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return run_decode<float>(params, false, stream);
    case DType::kFloat16: return run_decode<__half>(params, use_tensor_cores, stream);
    case DType::kBFloat16: return run_decode<__nv_bfloat16>(params, use_tensor_cores, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_prefill(DType dtype, const AttentionParams& params, int max_query_len,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return run_prefill<float>(params, max_query_len, stream);
    case DType::kFloat16: return run_prefill<__half>(params, max_query_len, stream);
    case DType::kBFloat16: return run_prefill<__nv_bfloat16>(params, max_query_len, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pagedllm
