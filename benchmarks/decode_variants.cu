// Launch shapes of the tensor-core decode kernel, bf16, head sizes 64 and 128,
// behind a C ABI for benchmarks/decode_variants.py (ctypes). Variant 0 is the
// shape platforms/cuda launches (DecodeMmaFor); the others change one or two
// of its knobs (decode_mma.cuh documents them). Stream 0 throughout.
#include <type_traits>

#include "../platforms/cuda/csrc/attention_impl.cuh"

namespace {

using pagedllm::AttentionParams;
using pagedllm::DecodeMmaShape;
using T = __nv_bfloat16;

// X(tile, stages, warps, max_width, l2_prefetch, q_in_registers)
#define DECODE_VARIANTS(X)   \
  X(32, 3, 4, 1, 256, false) \
  X(16, 2, 4, 1, 0, false)   \
  X(32, 3, 4, 1, 0, false)   \
  X(16, 2, 2, 2, 0, false)   \
  X(16, 2, 8, 8, 256, false)

#define SHAPE(HEAD, tile, stages, warps, width, prefetch, q_regs) \
  DecodeMmaShape<HEAD, tile, stages, warps, width, prefetch, q_regs>

static_assert(std::is_same_v<SHAPE(64, 32, 3, 4, 1, 256, false), pagedllm::DecodeMmaFor<64>> &&
                  std::is_same_v<SHAPE(128, 32, 3, 4, 1, 256, false), pagedllm::DecodeMmaFor<128>>,
              "variant 0 must be the launched shape");

template <int HEAD>
cudaError_t launch_variant(int variant, const AttentionParams& p) {
  int index = 0;
  cudaError_t err = cudaErrorInvalidValue;
#define LAUNCH(...)                                                                  \
  if (index++ == variant) {                                                          \
    err = pagedllm::launch_decode_mma<T, HEAD, SHAPE(HEAD, __VA_ARGS__)>(p, nullptr); \
  }
  DECODE_VARIANTS(LAUNCH)
#undef LAUNCH
  return err;
}

#define NAME(tile, stages, warps, width, prefetch, q_regs)                                 \
  "tile " #tile " stages " #stages " warps " #warps " width " #width " l2pf " #prefetch \
  " qreg " #q_regs,
const char* const kNames[] = {DECODE_VARIANTS(NAME)};
#undef NAME

}  // namespace

extern "C" {

int dv_num_variants() { return static_cast<int>(sizeof(kNames) / sizeof(kNames[0])); }
const char* dv_variant_name(int variant) { return kNames[variant]; }
int dv_params_size() { return static_cast<int>(sizeof(AttentionParams)); }
int dv_write_kv_params_size() { return static_cast<int>(sizeof(pagedllm::WriteKvParams)); }

// cudaErrorInvalidValue for a head size other than 64/128; a shape over the
// device's shared memory fails in cudaFuncSetAttribute (then call dv_sync).
int dv_decode(int variant, const AttentionParams* p) {
  if (p->head_size == 64) return launch_variant<64>(variant, *p);
  if (p->head_size == 128) return launch_variant<128>(variant, *p);
  return cudaErrorInvalidValue;
}

int dv_combine(const AttentionParams* p) { return pagedllm::launch_combine<T>(*p, nullptr); }
int dv_write_kv(const pagedllm::WriteKvParams* p) { return pagedllm::launch_write_kv(*p, nullptr); }

// Waits for the device; returns (and clears) the first pending error.
int dv_sync() {
  const cudaError_t err = cudaDeviceSynchronize();
  const cudaError_t last = cudaGetLastError();
  return err != cudaSuccess ? err : last;
}

}  // extern "C"
