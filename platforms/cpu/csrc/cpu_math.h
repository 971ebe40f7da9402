// Scalar helpers the CPU kernels share, written so that loops over them
// vectorize: bfloat16 <-> float (bfloat16 held as uint16_t bits) and exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float to_float(float x) { return x; }

inline float to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline T from_float(float f);

template <>
inline float from_float<float>(float f) { return f; }

// Round to nearest even, as torch's float -> bfloat16; NaN stays NaN.
template <>
inline uint16_t from_float<uint16_t>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// `f` rounded to T's precision and back: where the plain path stores a T.
template <typename T>
inline float rounded(float f) { return to_float(from_float<T>(f)); }

// e^x for x in [-87, 88] (clamped there), Cephes' expf scheme: x = n ln2 + r
// with |r| <= ln2 / 2 (ln2 split in two for an exact product), a degree-7
// polynomial for e^r and the exponent bits for 2^n. Arithmetic only, so its
// loops vectorize (std::exp is a scalar call without -ffast-math, which g++
// 12 would also let set flush-to-zero for the whole process). Relative
// error < 1e-7.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  float r = x - n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace
