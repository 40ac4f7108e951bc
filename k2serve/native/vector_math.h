// Vector-friendly maths shared by the native kernels.

#pragma once

#include <cstdint>

namespace k2serve_native {

// exp(x) in a form the compiler vectorizes inside `#pragma omp simd` loops (std::exp is a
// scalar libm call). Cephes' expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
// polynomial, 2^n by exponent bits; about 1 ulp. Inputs are clamped to [-87, 88], where
// float32 exp neither underflows nor overflows.
inline float exp_vectorizable(float x) {
  const float v = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float k = __builtin_floorf(v * 1.44269504088896341f + 0.5f);
  float r = v - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace k2serve_native
