// fp32 instantiations of the attention launchers (see attention_impl.cuh).
#include "attention_impl.cuh"

namespace pagedllm {

template cudaError_t run_decode<float>(const AttentionParams&, bool, cudaStream_t);
template cudaError_t run_prefill<float>(const AttentionParams&, int, cudaStream_t);

}  // namespace pagedllm
