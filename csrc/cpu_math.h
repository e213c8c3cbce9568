// Scalar helpers for the CPU kernels: element loads by dtype and a vectorizable exp2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace fastssl {

// dtype codes shared with fastssl/_native.py
enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

struct BFloat16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(_Float16 x) { return static_cast<float>(x); }
inline float to_float(BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// 2^x with a relative error below 2e-7, branch-free so that loops over it vectorize
// (glibc's exp2f only vectorizes under -ffast-math, which would also drop NaN checks).
// Domain: x <= 127 (the kernels pass x <= 0). x = n + f with n = round(x), |f| <= 1/2;
// 2^f = e^(f ln 2) by its Taylor series to degree 7 (remainder < 5e-9); 2^n is built in the
// exponent bits. NaN stays NaN; x < -126 gives 0 (no subnormal results).
inline float fast_exp2(float x) {
  const float clamped = x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);  // NaN passes through
  const float round_to_integer = 12582912.0f;  // 1.5 * 2^23: adding it rounds to nearest
  const float n = (clamped + round_to_integer) - round_to_integer;
  const float y = (clamped - n) * 0.6931471805599453f;
  float p = 1.0f / 5040.0f;
  p = p * y + 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  const float result = p * scale;
  return x < -126.0f ? 0.0f : result;
}

template <typename Fn>
void dispatch_dtype(int dtype, Fn&& fn) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: fn(static_cast<const float*>(nullptr)); break;
    case DType::BFloat16: fn(static_cast<const BFloat16*>(nullptr)); break;
    case DType::Float16: fn(static_cast<const _Float16*>(nullptr)); break;
    default: throw std::invalid_argument("fastssl._C: unsupported dtype code");
  }
}

}  // namespace fastssl
