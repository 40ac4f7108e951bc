// y[M, N] = x[M, K] @ W^T with W int8 and one float32 scale per output row (the quantized
// models' LM head for small steps).
//
// x is quantized per row to int16 (x ~ sx * qx, sx = max|x| / 32767: an error of at most
// max|x| / 65534 an element, far below bfloat16's, which torch's int8 kernel rounds x to),
// and the dot products are exact integer sums (vpmaddwd: 32 int8 x int16 products a
// step), converted to float32 every 256 steps before they could overflow. Half the
// instructions of widening W to float32, so the kernel keeps up with memory: a batch-1
// decode step reads the whole head (49152 x 576 bytes here) once.
//
// Every y[r, n] is one fixed sequence of operations over K whatever M is, whichever rows
// share its tile and whichever thread computes it, so a token's logits never depend on
// what else is in the batch. Threads split the N output rows; a tile of 4 output rows x up
// to 4 input rows reuses each loaded weight vector.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "isa.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kRowTile = 4;  // activation rows per tile
constexpr int kColTile = 4;  // output features per tile
constexpr int64_t kFlushSteps = 256;  // 32-element steps between int32 -> float32 flushes

#if defined(__AVX512F__)

template <int R, int NB>
inline void int8_tile_avx512(const int16_t* x, int64_t ldx, const float* x_scale, const int8_t* w,
                      const float* scale, int64_t K, float* y, int64_t ldy) {
  __m512 total[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) total[b][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 32 * kFlushSteps) {
    const int64_t k1 = std::min(K, k0 + 32 * kFlushSteps);
    __m512i acc[NB][R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 32) {
      __m512i xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_si512(x + r * ldx + k);
      for (int b = 0; b < NB; ++b) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * K + k)));
        for (int r = 0; r < R; ++r) acc[b][r] = _mm512_add_epi32(acc[b][r], _mm512_madd_epi16(wv, xv[r]));
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) total[b][r] = _mm512_add_ps(total[b][r], _mm512_cvtepi32_ps(acc[b][r]));
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) y[r * ldy + b] = _mm512_reduce_add_ps(total[b][r]) * (x_scale[r] * scale[b]);
}

#endif

#if defined(__AVX2__)
// AVX2: the 16 lanes as two 8-lane halves (elements 0-15 and 16-31 of each 32-element step),
// then the portable path's sequential sum over the 16 lanes: bitwise the portable result.
template <int R, int NB>
inline void int8_tile_avx2(const int16_t* x, int64_t ldx, const float* x_scale, const int8_t* w,
                           const float* scale, int64_t K, float* y, int64_t ldy) {
  for (int b = 0; b < NB; ++b) {  // one output feature at a time: R x 2 accumulators fit the 16 registers
    __m256 total[R][2];
    for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 32 * kFlushSteps) {
      const int64_t k1 = std::min(K, k0 + 32 * kFlushSteps);
      __m256i acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k1; k += 32) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * K + k)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * K + k + 16)));
        for (int r = 0; r < R; ++r) {
          const __m256i* xr = reinterpret_cast<const __m256i*>(x + r * ldx + k);
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, _mm256_loadu_si256(xr)));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, _mm256_loadu_si256(xr + 1)));
        }
      }
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) total[r][h] = _mm256_add_ps(total[r][h], _mm256_cvtepi32_ps(acc[r][h]));
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float lanes[16];
      _mm256_store_ps(lanes, total[r][0]);
      _mm256_store_ps(lanes + 8, total[r][1]);
      float sum = 0.f;
      for (int i = 0; i < 16; ++i) sum += lanes[i];
      y[r * ldy + b] = sum * (x_scale[r] * scale[b]);
    }
  }
}
#endif

// portable: the same per-element order of operations, 16 lanes emulated
template <int R, int NB>
inline void int8_tile_portable(const int16_t* x, int64_t ldx, const float* x_scale, const int8_t* w,
                      const float* scale, int64_t K, float* y, int64_t ldy) {
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) {
      float total[16] = {0};
      for (int64_t k0 = 0; k0 < K; k0 += 32 * kFlushSteps) {
        const int64_t k1 = std::min(K, k0 + 32 * kFlushSteps);
        int32_t acc[16] = {0};
        for (int64_t k = k0; k < k1; k += 32)
          for (int i = 0; i < 16; ++i)
            acc[i] += int32_t(w[b * K + k + 2 * i]) * x[r * ldx + k + 2 * i] +
                      int32_t(w[b * K + k + 2 * i + 1]) * x[r * ldx + k + 2 * i + 1];
        for (int i = 0; i < 16; ++i) total[i] += float(acc[i]);
      }
      float sum = 0.f;
      for (int i = 0; i < 16; ++i) sum += total[i];
      y[r * ldy + b] = sum * (x_scale[r] * scale[b]);
    }
}

// The path chosen at load (k2serve_native::active_isa), the same for every tile of a call.
template <int R, int NB>
inline void int8_tile(int isa, const int16_t* x, int64_t ldx, const float* x_scale, const int8_t* w,
                      const float* scale, int64_t K, float* y, int64_t ldy) {
#if defined(__AVX512F__)
  if (isa >= k2serve_native::kAvx512) return int8_tile_avx512<R, NB>(x, ldx, x_scale, w, scale, K, y, ldy);
#endif
#if defined(__AVX2__)
  if (isa >= k2serve_native::kAvx2) return int8_tile_avx2<R, NB>(x, ldx, x_scale, w, scale, K, y, ldy);
#endif
  int8_tile_portable<R, NB>(x, ldx, x_scale, w, scale, K, y, ldy);
}

// Runs `tile<R, NB>` over every (row tile, feature tile), threads splitting the features.
template <template <int, int> class Tile, typename Args>
void for_tiles(int64_t M, int64_t N, const Args& args) {
  const int64_t col_tiles = (N + kColTile - 1) / kColTile;
  at::parallel_for(0, col_tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * kColTile;
      const bool full = n + kColTile <= N;
      for (int64_t r = 0; r < M; r += kRowTile) {
        const int64_t rows = std::min<int64_t>(kRowTile, M - r);
        if (full) {
          switch (rows) {
            case 4: Tile<4, kColTile>::run(args, r, n); break;
            case 3: Tile<3, kColTile>::run(args, r, n); break;
            case 2: Tile<2, kColTile>::run(args, r, n); break;
            default: Tile<1, kColTile>::run(args, r, n); break;
          }
        } else {
          for (int64_t c = n; c < N; ++c)
            for (int64_t rr = r; rr < r + rows; ++rr) Tile<1, 1>::run(args, rr, c);
        }
      }
    }
  });
}

struct Int8Args {
  const int16_t* x; const float* x_scale; const int8_t* w; const float* scale; float* y; int64_t K, N;
  int isa;
};
template <int R, int NB>
struct Int8Tile {
  static void run(const Int8Args& a, int64_t r, int64_t n) {
    int8_tile<R, NB>(a.isa, a.x + r * a.K, a.K, a.x_scale + r, a.w + n * a.K, a.scale + n, a.K,
                     a.y + r * a.N + n, a.N);
  }
};

// Each row of x as int16 codes and a scale: x ~ scale * codes, |codes| <= 32767.
void quantize_rows_int16(const float* x, int64_t M, int64_t K, int16_t* codes, float* scales) {
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x + r * K;
    float amax = 0.f;
    for (int64_t i = 0; i < K; ++i) amax = std::max(amax, std::fabs(row[i]));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    scales[r] = amax / 32767.f;
    for (int64_t i = 0; i < K; ++i) codes[r * K + i] = static_cast<int16_t>(std::nearbyint(row[i] * inv));
  }
}

}  // namespace

// x float32 [M, K] (K a multiple of 32); w int8 [N, K]; scale float32 [N] -> float32 [M, N]
// isa < 0: the process's path; tests pass one to compare paths.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && scale.dim() == 1, "bad ranks");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 32 == 0 && w.size(1) == K && scale.size(0) == N, "shape mismatch");
  if (isa < 0) isa = k2serve_native::active_isa();
  TORCH_CHECK(isa <= k2serve_native::compiled_isa(), "that vector path is not built on this CPU");
  TORCH_CHECK(w.scalar_type() == torch::kChar && scale.scalar_type() == torch::kFloat &&
                  w.is_contiguous() && scale.is_contiguous(), "weights must be contiguous int8 / float32");
  x = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  auto codes = torch::empty({M, K}, x.options().dtype(torch::kShort));
  auto x_scales = torch::empty({M}, x.options());
  quantize_rows_int16(x.data_ptr<float>(), M, K, codes.data_ptr<int16_t>(), x_scales.data_ptr<float>());
  Int8Args args{codes.data_ptr<int16_t>(), x_scales.data_ptr<float>(), w.data_ptr<int8_t>(),
                scale.data_ptr<float>(), y.data_ptr<float>(), K, N, static_cast<int>(isa)};
  for_tiles<Int8Tile>(M, N, args);
  return y;
}
