// Paged decode attention on the CPU: one new query token per sequence reads
// its context straight from the block-paged cache, each K/V byte once; and
// the cache write (reshape-and-cache) of the new tokens' K/V.
//
// Plain C++ (no torch headers) behind a C ABI, compiled with g++ -O3
// -march=native -fopenmp by platforms/cpu/native.py and called through
// ctypes. Layouts (element strides given where a caller may pass views):
//   query   [num_tokens, num_heads, head_size]      rows `token_rows[i]`
//   out     [num_tokens, num_heads, head_size]      same rows
//   caches  [num_blocks, block_size, num_kv_heads, head_size] contiguous
//   block_tables [*, block_table_stride] int32; seq_ids, seq_lens, token_rows [n] int64
// Scores, softmax and the P.V accumulation are float32 whatever the cache
// dtype (float32 or bfloat16). Only positions < seq_len are read, so unused
// cache slots (NaN-poisoned in the tests) never reach the output.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"

namespace {

struct DecodeArgs {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int64_t* seq_ids;
  const int64_t* seq_lens;
  const int64_t* token_rows;
  int64_t query_stride_token, query_stride_head;
  int64_t out_stride_token, out_stride_head;
  int64_t block_table_stride, max_blocks;  // block_tables row stride and length
  int64_t num_blocks;
  int num_seqs, num_heads, num_kv_heads, head_size, block_size;
  float scale;
};

template <typename T>
inline void load_row(const T* src, float* dst, int n);

template <>
inline void load_row<float>(const float* src, float* dst, int n) {
  std::memcpy(dst, src, n * sizeof(float));
}

template <>
inline void load_row<uint16_t>(const uint16_t* src, float* dst, int n) {
#pragma omp simd
  for (int d = 0; d < n; ++d) dst[d] = to_float(src[d]);
}

template <typename T>
inline void store_row(const float* src, float inv, T* dst, int n);

template <>
inline void store_row<float>(const float* src, float inv, float* dst, int n) {
  for (int d = 0; d < n; ++d) dst[d] = src[d] * inv;
}

template <>
inline void store_row<uint16_t>(const float* src, float inv, uint16_t* dst, int n) {
  for (int d = 0; d < n; ++d) dst[d] = from_float<uint16_t>(src[d] * inv);
}

// One sequence, all its heads. HEAD > 0 fixes the head size at compile time
// (vectorized loops of known trip count); HEAD == 0 reads it from the args.
// scratch: [num_heads * seq_len] scores + [num_heads * head] q + acc + 2 rows.
// Whether sequence i's block-table row covers its seq_len and every entry
// it reads names a block of the pool.
bool blocks_in_pool(const DecodeArgs& a, int i) {
  const int32_t* blocks = a.block_tables + a.seq_ids[i] * a.block_table_stride;
  const int64_t used = (a.seq_lens[i] + a.block_size - 1) / a.block_size;
  if (used > a.max_blocks) return false;
  for (int64_t b = 0; b < used; ++b) {
    if (blocks[b] < 0 || blocks[b] >= a.num_blocks) return false;
  }
  return true;
}

template <typename T, int HEAD>
void decode_sequence(const DecodeArgs& a, int i, std::vector<float>& scratch) {
  const int D = HEAD > 0 ? HEAD : a.head_size;
  const int H = a.num_heads, KVH = a.num_kv_heads, G = H / KVH;
  const int64_t seq = a.seq_ids[i];
  const int L = static_cast<int>(a.seq_lens[i]);
  scratch.resize(static_cast<size_t>(H) * L + 2 * static_cast<size_t>(H) * D + D);
  float* scores = scratch.data();
  float* q = scores + static_cast<size_t>(H) * L;
  float* acc = q + static_cast<size_t>(H) * D;
  float* row = acc + static_cast<size_t>(H) * D;

  const T* query = static_cast<const T*>(a.query) + a.token_rows[i] * a.query_stride_token;
  for (int h = 0; h < H; ++h) {
    load_row<T>(query + h * a.query_stride_head, q + h * D, D);
    for (int d = 0; d < D; ++d) q[h * D + d] *= a.scale;
  }
  const int32_t* blocks = a.block_tables + seq * a.block_table_stride;
  const T* key_cache = static_cast<const T*>(a.key_cache);
  const T* value_cache = static_cast<const T*>(a.value_cache);
  auto cache_row = [&](int t) {  // element offset of position t, kv head 0
    const int64_t slot = static_cast<int64_t>(blocks[t / a.block_size]) * a.block_size +
                         t % a.block_size;
    return slot * KVH * D;
  };

  for (int t = 0; t < L; ++t) {
    const int64_t offset = cache_row(t);
    for (int kvh = 0; kvh < KVH; ++kvh) {
      load_row<T>(key_cache + offset + kvh * D, row, D);
      for (int g = 0; g < G; ++g) {
        const float* qh = q + (kvh * G + g) * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; ++d) s += qh[d] * row[d];
        scores[(kvh * G + g) * static_cast<size_t>(L) + t] = s;
      }
    }
  }

  std::vector<float> inv_sum(H);
  for (int h = 0; h < H; ++h) {
    float* s = scores + h * static_cast<size_t>(L);
    float m = s[0];
#pragma omp simd reduction(max : m)
    for (int t = 1; t < L; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < L; ++t) {
      // Below e^-69 a weight is 0 for the sum; the floor keeps weight * value
      // products normal floats (denormals are slow).
      s[t] = fast_exp(std::max(s[t] - m, -69.f));
      sum += s[t];
    }
    inv_sum[h] = 1.f / sum;
  }

  std::fill(acc, acc + static_cast<size_t>(H) * D, 0.f);
  for (int t = 0; t < L; ++t) {
    const int64_t offset = cache_row(t);
    for (int kvh = 0; kvh < KVH; ++kvh) {
      load_row<T>(value_cache + offset + kvh * D, row, D);
      for (int g = 0; g < G; ++g) {
        const int h = kvh * G + g;
        const float p = scores[h * static_cast<size_t>(L) + t];
        float* acc_h = acc + h * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) acc_h[d] += p * row[d];
      }
    }
  }

  T* out = static_cast<T*>(a.out) + a.token_rows[i] * a.out_stride_token;
  for (int h = 0; h < H; ++h) store_row<T>(acc + h * D, inv_sum[h], out + h * a.out_stride_head, D);
}

template <typename T, int HEAD>
void decode_all(const DecodeArgs& a, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < a.num_seqs; ++i) decode_sequence<T, HEAD>(a, i, scratch);
  }
}

// The first sequence whose block table names a block outside the pool, or -1.
int first_bad_sequence(const DecodeArgs& a) {
  for (int i = 0; i < a.num_seqs; ++i) {
    if (!blocks_in_pool(a, i)) return i;
  }
  return -1;
}

template <typename T>
void dispatch_head(const DecodeArgs& a, int num_threads) {
  switch (a.head_size) {
    case 64: return decode_all<T, 64>(a, num_threads);
    case 128: return decode_all<T, 128>(a, num_threads);
    default: return decode_all<T, 0>(a, num_threads);
  }
}

struct WriteKvArgs {
  void* key_cache;
  void* value_cache;
  const void* key;
  const void* value;
  const int64_t* slot_mapping;
  int64_t key_stride_token, key_stride_head, value_stride_token, value_stride_head;
  int64_t num_slots;
  int num_tokens, num_kv_heads, head_size, element_size;
};

// Copies token t's rows [kv_heads][head_size] of key/value (strided views,
// contiguous head dim) into cache slot slot_mapping[t]; slot -1 is skipped.
// Returns -1, or the first token whose slot is outside [-1, num_slots)
// (nothing is written then).
int write_kv(const WriteKvArgs& a) {
  for (int t = 0; t < a.num_tokens; ++t) {
    if (a.slot_mapping[t] < -1 || a.slot_mapping[t] >= a.num_slots) return t;
  }
  const int64_t row_bytes = static_cast<int64_t>(a.head_size) * a.element_size;
  const int64_t slot_bytes = a.num_kv_heads * row_bytes;
  for (int t = 0; t < a.num_tokens; ++t) {
    const int64_t slot = a.slot_mapping[t];
    if (slot < 0) continue;
    char* k_dst = static_cast<char*>(a.key_cache) + slot * slot_bytes;
    char* v_dst = static_cast<char*>(a.value_cache) + slot * slot_bytes;
    const char* k_src = static_cast<const char*>(a.key) + t * a.key_stride_token * a.element_size;
    const char* v_src =
        static_cast<const char*>(a.value) + t * a.value_stride_token * a.element_size;
    for (int h = 0; h < a.num_kv_heads; ++h) {
      std::memcpy(k_dst + h * row_bytes, k_src + h * a.key_stride_head * a.element_size,
                  row_bytes);
      std::memcpy(v_dst + h * row_bytes, v_src + h * a.value_stride_head * a.element_size,
                  row_bytes);
    }
  }
  return -1;
}

}  // namespace

extern "C" {

int pagedllm_cpu_write_kv_args_size() { return static_cast<int>(sizeof(WriteKvArgs)); }

int pagedllm_cpu_write_kv(const WriteKvArgs* args) { return write_kv(*args); }

int pagedllm_cpu_args_size() { return static_cast<int>(sizeof(DecodeArgs)); }

// dtype: 0 float32, 1 bfloat16. Returns 0; -1 for an unsupported dtype;
// 1 + i when sequence i's block table names a block outside the pool
// (nothing is computed then).
int pagedllm_cpu_decode(const DecodeArgs* args, int dtype, int num_threads) {
  const int bad = first_bad_sequence(*args);
  if (bad >= 0) return 1 + bad;
  if (dtype == 0) {
    dispatch_head<float>(*args, num_threads);
  } else if (dtype == 1) {
    dispatch_head<uint16_t>(*args, num_threads);
  } else {
    return -1;
  }
  return 0;
}

}  // extern "C"
