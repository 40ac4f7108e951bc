// Elementwise steps of a Llama-style decoder layer fused into one call each, for the
// quantized models' lean layer path, where the per-op cost of PyTorch's small ops (several
// microseconds each, ~10 ops a layer) is a large share of a batch-1 decode step.
//
// Rows are independent and each row's arithmetic is fixed, so a token's result does not
// depend on what else is in the batch or on the thread count.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "vector_math.h"

namespace {

template <typename T>
void add_rms_norm_rows(const T* x, const float* residual, const float* weight, float eps,
                       int64_t rows, int64_t hidden, float* sum_out, float* normed) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      float* s = sum_out + r * hidden;
      float squares = 0.f;
      if (residual != nullptr) {
        const float* rr = residual + r * hidden;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) {
          s[i] = static_cast<float>(xr[i]) + rr[i];
          squares += s[i] * s[i];
        }
      } else {
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) {
          s[i] = static_cast<float>(xr[i]);
          squares += s[i] * s[i];
        }
      }
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
      float* n = normed + r * hidden;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) n[i] = s[i] * inv * weight[i];
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gate_up, int64_t rows, int64_t inter, T* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * inter;
      const T* up = gate + inter;
      T* o = out + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float g = static_cast<float>(gate[i]);
        o[i] = static_cast<T>(g / (1.f + k2serve_native::exp_vectorizable(-g)) * static_cast<float>(up[i]));
      }
    }
  });
}

// bfloat16 through its bits, so the loop vectorizes (c10's conversions did not: 12 us a
// 1536-wide decode row). Widening is exact; narrowing rounds to nearest even, NaN to
// 0x7FC0, bit for bit c10::BFloat16(float).
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t rounded = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
  return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
}

void silu_mul_rows_bf16(const uint16_t* gate_up, int64_t rows, int64_t inter, uint16_t* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* gate = gate_up + r * 2 * inter;
      const uint16_t* up = gate + inter;
      uint16_t* o = out + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float g = bf16_bits_to_float(gate[i]);
        o[i] = float_to_bf16_bits(g / (1.f + k2serve_native::exp_vectorizable(-g)) * bf16_bits_to_float(up[i]));
      }
    }
  });
}

}  // namespace

// x [M, H] float32 or bfloat16; residual [M, H] float32 or None; weight [H] float32.
// -> (RMSNorm(x + residual) * weight, x + residual), both float32.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "shape mismatch");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.is_contiguous(), "weight: float32");
  x = x.contiguous();
  const int64_t rows = x.size(0), hidden = x.size(1);
  const float* res = nullptr;
  torch::Tensor residual_in;
  if (residual.has_value()) {
    residual_in = residual->contiguous();
    TORCH_CHECK(residual_in.scalar_type() == torch::kFloat && residual_in.sizes() == x.sizes(),
                "residual: float32, the shape of x");
    res = residual_in.data_ptr<float>();
  }
  auto options = x.options().dtype(torch::kFloat);
  auto sum = torch::empty({rows, hidden}, options);
  auto normed = torch::empty({rows, hidden}, options);
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == torch::kFloat) {
    add_rms_norm_rows(x.data_ptr<float>(), res, weight.data_ptr<float>(), e, rows, hidden,
                      sum.data_ptr<float>(), normed.data_ptr<float>());
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "x: float32 or bfloat16");
    add_rms_norm_rows(x.data_ptr<at::BFloat16>(), res, weight.data_ptr<float>(), e, rows, hidden,
                      sum.data_ptr<float>(), normed.data_ptr<float>());
  }
  return {normed, sum};
}

// gate_up [M, 2I] (gate then up), float32 or bfloat16 -> silu(gate) * up [M, I], same dtype
// (computed in float32, rounded once).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up: [M, 2I]");
  gate_up = gate_up.contiguous();
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({rows, inter}, gate_up.options());
  if (gate_up.scalar_type() == torch::kFloat) {
    silu_mul_rows(gate_up.data_ptr<float>(), rows, inter, out.data_ptr<float>());
  } else {
    TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16, "gate_up: float32 or bfloat16");
    silu_mul_rows_bf16(reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>()), rows, inter,
                       reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  }
  return out;
}
