// Scalar helpers for the CPU kernels: element loads by dtype and a vectorizable exp2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

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

// Natural log of a positive normal or subnormal float, branch-free so that loops over it
// vectorize (glibc's logf only vectorizes under -ffast-math). Subnormals are scaled by 2^24
// first; x = 2^e * m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| < 0.172, by its odd series to s^11 (remainder < 2e-10): about 1 ulp. x == 0 gives a
// meaningless finite value (callers guard it); NaN and +inf propagate.
inline float log_positive(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float scaled = subnormal ? x * 16777216.0f : x;
  int32_t bits;
  std::memcpy(&bits, &scaled, sizeof(bits));
  // Subtracting the bits of sqrt(1/2) puts the mantissa range [sqrt(1/2), sqrt(2)) at exponent 0.
  const int32_t offset = bits - 0x3f3504f3;
  const int32_t exponent = offset >> 23;
  const int32_t mantissa_bits = bits - (exponent << 23);
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof(m));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float z = s * s;
  float p = 1.0f / 11.0f;
  p = p * z + 1.0f / 9.0f;
  p = p * z + 1.0f / 7.0f;
  p = p * z + 1.0f / 5.0f;
  p = p * z + 1.0f / 3.0f;
  p = p * z + 1.0f;
  const float log_m = 2.0f * s * p;
  const float e = static_cast<float>(exponent) - (subnormal ? 24.0f : 0.0f);
  const float result = e * 0.693147180559945309f + log_m;
  return x == x && x < INFINITY ? result : x;  // NaN and +inf as they are
}

// Copy n elements of a strided row of dtype code `dtype` into float32.
inline void load_floats(uintptr_t data, int dtype, int64_t offset, int64_t n, int64_t stride, float* out);

template <typename Fn>
void dispatch_dtype(int dtype, Fn&& fn) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: fn(static_cast<const float*>(nullptr)); break;
    case DType::BFloat16: fn(static_cast<const BFloat16*>(nullptr)); break;
    case DType::Float16: fn(static_cast<const _Float16*>(nullptr)); break;
    default: throw std::invalid_argument("fastssl._C: unsupported dtype code");
  }
}

inline void load_floats(uintptr_t data, int dtype, int64_t offset, int64_t n, int64_t stride, float* out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* in = reinterpret_cast<const T*>(data) + offset;
    for (int64_t j = 0; j < n; ++j) out[j] = to_float(in[j * stride]);
  });
}

}  // namespace fastssl
