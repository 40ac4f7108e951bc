// y = x @ W^T with W in 4-bit groups of 32 (w = scale * q + min, q in 0..15), on AVX2 or
// AVX-512 integer dot products: the int4 linear of CPUs without AMX. Same weight layout as
// int4_amx.cpp (int4_amx_pack): per block of 16 output columns and group of 32 inputs, 8
// chunks of 32 bytes, chunk j holding k-pair j in its low nibbles and k-pair j + 8 in its
// high nibbles, byte 2c + i of a chunk being column c's input 2 * pair + i.
//
// x (float32 or bfloat16) is quantized per row and group of 32 to int16: x ~ d * c with
// d = max|x_g| / 32767, |x - d c| <= 0.51 d (2^-16 of the group's largest element, far
// finer than bfloat16's 2^-9 of every element). Then per row, column and group:
//   dot = sum_k q_k c_k               exact in int32 (vpmaddwd: 16-bit pairs; |dot| < 2^24,
//                                     so its float32 conversion is exact too)
//   acc = fma(scale * d, dot, acc)    float32
//   acc = fma(min, d * sum_k c_k, acc)
// for g = 0, 1, ..., and y = acc rounded once to bfloat16. The error against x @ W^T in
// float64 is the bfloat16 rounding (2^-8 |y|: half a unit of its 8 significant bits) plus sum_g 0.51 d_g sum_k |w_gk| (the
// quantization of x) plus float32 rounding of the G-step sums (~(G + 2) 2^-24 sum |terms|).
//
// No step depends on M, on the other rows or on how rows are tiled, and the integer dots
// are exact whatever their order, so a row's result is bitwise the same at any M — and the
// same on every path (portable, AVX2, AVX-512; tested). Weight bytes are unpacked once per
// group and reused by every row of the step: at M = 1 the kernel streams the weights, at
// M = 32 it is bound by vpmaddwd (32 multiply-adds a 256-bit instruction, twice float32
// FMA's rate).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "isa.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kCols = 16;
constexpr int64_t kBlockBytes = kGroup * kCols / 2;

// Row r's quantized activations: codes [M, K] int16, and per group d and d * sum(codes).
struct QuantizedRows {
  const int16_t* codes;
  const float* d;
  const float* dc;
  int64_t K, G;
};

// One group of 32: codes c, d and d * sum(c) (see the top of this file); false (nothing
// written) where the group holds an inf or NaN.
template <typename T>
inline bool quantize_group_portable(const T* src, int16_t* c, float& d, float& dc) {
  float buf[kGroup];
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < kGroup; ++k) {
    buf[k] = static_cast<float>(src[k]);
    amax = std::max(amax, std::fabs(buf[k]));
    finite = finite && std::isfinite(buf[k]);
  }
  if (!finite) return false;
  const float inv = amax > 0.f ? 32767.f / amax : 0.f;
  int32_t total = 0;
  for (int64_t k = 0; k < kGroup; ++k) {
    c[k] = static_cast<int16_t>(std::nearbyint(buf[k] * inv));
    total += c[k];
  }
  d = amax / 32767.f;
  dc = d * static_cast<float>(total);
  return true;
}

// The vector forms compute every value as the portable one does (the maximum is exact in
// any order; the product is one float multiply; converting rounds to nearest even, as
// nearbyint does in the default rounding mode), so codes and scales are bitwise the same.
#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __mmask16 nonfinite16(__m512 v) {  // exponent all ones: inf or NaN
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  return _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exponent), exponent);
}

template <typename T>
inline bool quantize_group_avx512(const T* src, int16_t* c, float& d, float& dc) {
  const __m512 a = widen16(src), b = widen16(src + 16);
  if (nonfinite16(a) | nonfinite16(b)) return false;
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
  const __m512i ca = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), cb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), _mm512_cvtepi32_epi16(ca));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 16), _mm512_cvtepi32_epi16(cb));
  d = amax / 32767.f;
  dc = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(ca, cb)));
  return true;
}
#endif

#if defined(__AVX2__)
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <typename T>
inline bool quantize_group_avx2(const T* src, int16_t* c, float& d, float& dc) {
  __m256 v[4];
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256i nonfinite = _mm256_setzero_si256();
  __m256 peak = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = widen8(src + 8 * i);
    nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v[i]), exponent), exponent));
    peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, v[i]));
  }
  if (!_mm256_testz_si256(nonfinite, nonfinite)) return false;
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 4; i += 2) {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)), hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], inv));
    total = _mm256_add_epi32(total, _mm256_add_epi32(lo, hi));
    // packs interleaves 128-bit lanes: [lo 0-3, hi 0-3, lo 4-7, hi 4-7]; 0xD8 restores the order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 8 * i), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
  }
  const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  const __m128i u = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  d = amax / 32767.f;
  dc = d * static_cast<float>(_mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1))));
  return true;
}
#endif

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int16_t* codes, float* d, float* dc, int isa) {
  const int64_t G = K / kGroup;
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const T* src = x + m * K + g * kGroup;
        int16_t* c = codes + m * K + g * kGroup;
        float& dg = d[m * G + g];
        float& dcg = dc[m * G + g];
        bool done;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if (isa >= k2serve_native::kAvx512) done = quantize_group_avx512(src, c, dg, dcg); else
#endif
#if defined(__AVX2__)
        if (isa >= k2serve_native::kAvx2) done = quantize_group_avx2(src, c, dg, dcg); else
#endif
        done = quantize_group_portable(src, c, dg, dcg);
        if (!done) {  // inf or NaN in x: a non-finite result, as a float GEMM gives
          std::fill(c, c + kGroup, int16_t{0});
          dg = dcg = std::numeric_limits<float>::quiet_NaN();
        }
      }
  });
}

inline float to_float(float v) { return v; }
inline float to_float(at::Half v) { return static_cast<float>(v); }

// ---- portable: the reference every vector path equals bitwise ----
template <typename S>
void block_portable(const QuantizedRows& x, int64_t M, const uint8_t* wb, const S* sb, const S* mb,
                    float* acc) {
  for (int64_t g = 0; g < x.G; ++g) {
    const uint8_t* chunk = wb + g * kBlockBytes;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* c = x.codes + m * x.K + g * kGroup;
      const float d = x.d[m * x.G + g], dc = x.dc[m * x.G + g];
      for (int64_t col = 0; col < kCols; ++col) {
        int32_t dot = 0;
        for (int64_t p = 0; p < kGroup / 2; ++p)
          for (int64_t i = 0; i < 2; ++i) {
            const uint8_t byte = chunk[(p % 8) * 32 + 2 * col + i];
            const int32_t q = p < 8 ? (byte & 15) : (byte >> 4);
            dot += q * c[2 * p + i];
          }
        float& a = acc[m * kCols + col];
        a = std::fma(to_float(sb[g * kCols + col]) * d, static_cast<float>(dot), a);
        a = std::fma(to_float(mb[g * kCols + col]), dc, a);
      }
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Every cache line of a group's block, 16 blocks (4 KB) ahead. Prefetching only some of a
// block's 4 lines halved the M = 1 rate on Zen 3 (8 vs 19 GB/s streaming from DRAM,
// measured): the hardware prefetcher then left the other lines to demand misses.
constexpr int64_t kAheadBlocks = 16;
inline void prefetch_block(const uint8_t* p) {
  for (int64_t line = 0; line < kBlockBytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + line), _MM_HINT_T0);
}

inline __m256i pair(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// ---- AVX2: 8 columns a vector; a group's 256 bytes unpacked once into w[pair][half] ----
template <int R, typename S>
inline void rows_avx2(const __m256i (&w)[16][2], const QuantizedRows& x, int64_t m0, int64_t g,
                      const S* sg, const S* mg, float* acc) {
  __m256i dot[R][2];
  for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
  for (int p = 0; p < 16; ++p)
    for (int r = 0; r < R; ++r) {
      const __m256i xv = pair(x.codes + (m0 + r) * x.K + g * kGroup + 2 * p);
      dot[r][0] = _mm256_add_epi32(dot[r][0], _mm256_madd_epi16(w[p][0], xv));
      dot[r][1] = _mm256_add_epi32(dot[r][1], _mm256_madd_epi16(w[p][1], xv));
    }
  for (int h = 0; h < 2; ++h) {
    const __m256 s = load8(sg + 8 * h), mn = load8(mg + 8 * h);
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      float* a = acc + m * kCols + 8 * h;
      const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(x.d[m * x.G + g]));
      __m256 v = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(dot[r][h]), _mm256_loadu_ps(a));
      v = _mm256_fmadd_ps(mn, _mm256_set1_ps(x.dc[m * x.G + g]), v);
      _mm256_storeu_ps(a, v);
    }
  }
}

// At most 4 rows (decode of a few sequences): each chunk is unpacked into registers and used
// at once, no round trip through memory. The same integer dots, so the same results.
template <int R, typename S>
void block_avx2_direct(const QuantizedRows& x, const uint8_t* wb, const S* sb, const S* mb, float* acc) {
  const __m256i low = _mm256_set1_epi16(15);
  for (int64_t g = 0; g < x.G; ++g) {
    const uint8_t* chunk = wb + g * kBlockBytes;
    prefetch_block(chunk + kAheadBlocks * kBlockBytes);
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      const __m256i b0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + j * 32)));
      const __m256i b1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + j * 32 + 16)));
      const __m256i lo0 = _mm256_and_si256(b0, low), hi0 = _mm256_srli_epi16(b0, 4);
      const __m256i lo1 = _mm256_and_si256(b1, low), hi1 = _mm256_srli_epi16(b1, 4);
      for (int r = 0; r < R; ++r) {
        const int16_t* c = x.codes + r * x.K + g * kGroup;
        const __m256i xa = pair(c + 2 * j), xb = pair(c + 2 * (j + 8));
        dot[r][0] = _mm256_add_epi32(dot[r][0], _mm256_add_epi32(_mm256_madd_epi16(lo0, xa), _mm256_madd_epi16(hi0, xb)));
        dot[r][1] = _mm256_add_epi32(dot[r][1], _mm256_add_epi32(_mm256_madd_epi16(lo1, xa), _mm256_madd_epi16(hi1, xb)));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = load8(sb + g * kCols + 8 * h), mn = load8(mb + g * kCols + 8 * h);
      for (int r = 0; r < R; ++r) {
        float* a = acc + r * kCols + 8 * h;
        const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(x.d[r * x.G + g]));
        __m256 v = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(dot[r][h]), _mm256_loadu_ps(a));
        v = _mm256_fmadd_ps(mn, _mm256_set1_ps(x.dc[r * x.G + g]), v);
        _mm256_storeu_ps(a, v);
      }
    }
  }
}

template <typename S>
void block_avx2(const QuantizedRows& x, int64_t M, const uint8_t* wb, const S* sb, const S* mb,
                float* acc) {
  switch (M) {
    case 1: return block_avx2_direct<1>(x, wb, sb, mb, acc);
    case 2: return block_avx2_direct<2>(x, wb, sb, mb, acc);
    case 3: return block_avx2_direct<3>(x, wb, sb, mb, acc);
    case 4: return block_avx2_direct<4>(x, wb, sb, mb, acc);
    default: break;
  }
  const __m256i low = _mm256_set1_epi16(15);
  __m256i w[16][2];
  for (int64_t g = 0; g < x.G; ++g) {
    const uint8_t* chunk = wb + g * kBlockBytes;
    prefetch_block(chunk + kAheadBlocks * kBlockBytes);
    for (int j = 0; j < 8; ++j)
      for (int h = 0; h < 2; ++h) {
        const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + j * 32 + 16 * h)));
        w[j][h] = _mm256_and_si256(bytes, low);
        w[j + 8][h] = _mm256_srli_epi16(bytes, 4);
      }
    const S* sg = sb + g * kCols;
    const S* mg = mb + g * kCols;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows_avx2<4>(w, x, m, g, sg, mg, acc);
    switch (M - m) {
      case 3: rows_avx2<3>(w, x, m, g, sg, mg, acc); break;
      case 2: rows_avx2<2>(w, x, m, g, sg, mg, acc); break;
      case 1: rows_avx2<1>(w, x, m, g, sg, mg, acc); break;
      default: break;
    }
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__) && defined(__F16C__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512i pair16(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline __m512i dot_step(__m512i acc, __m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, x);  // the same exact int32 sum, one instruction
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

// dot_step with x's pair broadcast from memory inside the instruction ({1to16}): GCC kept a
// separate broadcast per step, an extra vector op for every multiply-add.
inline __m512i dot_step_pair(__m512i acc, __m512i w, const int16_t* pair) {
#if defined(__AVX512VNNI__)
  __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(pair)));
  return acc;
#else
  return dot_step(acc, w, pair16(pair));
#endif
}

// ---- AVX-512: 16 columns a vector ----
template <int R, typename S>
inline void rows_avx512(const __m512i (&w)[16], const QuantizedRows& x, int64_t m0, int64_t g,
                        const S* sg, const S* mg, float* acc) {
  // Fully unrolled, so the 16 weight vectors and the R sums stay in registers: rolled
  // loops left w on the stack (a load per step) and copied the sums between registers.
  const int64_t K = x.K, G = x.G;
  const int16_t* c = x.codes + m0 * K + g * kGroup;
  __m512i dot[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
#pragma GCC unroll 16
  for (int p = 0; p < 16; ++p)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) dot[r] = dot_step_pair(dot[r], w[p], c + r * K + 2 * p);
  const __m512 s = load16(sg), mn = load16(mg);
  const float* d = x.d + m0 * G + g;
  const float* dc = x.dc + m0 * G + g;
  float* a = acc + m0 * kCols;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(d[r * G]));
    __m512 v = _mm512_fmadd_ps(sd, _mm512_cvtepi32_ps(dot[r]), _mm512_loadu_ps(a + r * kCols));
    v = _mm512_fmadd_ps(mn, _mm512_set1_ps(dc[r * G]), v);
    _mm512_storeu_ps(a + r * kCols, v);
  }
}

template <typename S>
void block_avx512(const QuantizedRows& x, int64_t M, const uint8_t* wb, const S* sb, const S* mb,
                  float* acc) {
  const __m512i low = _mm512_set1_epi16(15);
  __m512i w[16];
  for (int64_t g = 0; g < x.G; ++g) {
    const uint8_t* chunk = wb + g * kBlockBytes;
    // Every line of the block 16 blocks ahead, as the AVX2 path (prefetch_block) does:
    // 2 of 4 lines halved the streaming rate on Zen 3. Not yet measured on Zen 4.
    for (int64_t line = 0; line < kBlockBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(chunk + 16 * kBlockBytes + line), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + j * 32)));
      w[j] = _mm512_and_si512(bytes, low);
      w[j + 8] = _mm512_srli_epi16(bytes, 4);
    }
    const S* sg = sb + g * kCols;
    const S* mg = mb + g * kCols;
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) rows_avx512<8>(w, x, m, g, sg, mg, acc);
    for (; m + 4 <= M; m += 4) rows_avx512<4>(w, x, m, g, sg, mg, acc);
    for (; m < M; ++m) rows_avx512<1>(w, x, m, g, sg, mg, acc);
  }
}
#endif

template <typename S>
void run_blocks(const QuantizedRows& x, int64_t M, int64_t NB, const uint8_t* wp, const S* sp,
                const S* mp, at::BFloat16* out, int isa) {
  const int64_t N = NB * kCols;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(M * kCols);
    for (int64_t nb = begin; nb < end; ++nb) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint8_t* wb = wp + nb * x.G * kBlockBytes;
      const S* sb = sp + nb * x.G * kCols;
      const S* mb = mp + nb * x.G * kCols;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__) && defined(__F16C__)
      if (isa >= k2serve_native::kAvx512) {
        block_avx512(x, M, wb, sb, mb, acc.data());
      } else
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
      if (isa >= k2serve_native::kAvx2) {
        block_avx2(x, M, wb, sb, mb, acc.data());
      } else
#endif
      {
        block_portable(x, M, wb, sb, mb, acc.data());
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < kCols; ++c) out[m * N + nb * kCols + c] = at::BFloat16(acc[m * kCols + c]);
    }
  });
}

}  // namespace

// x: float32 or bfloat16 [M, K]; the weight from int4_amx_pack. Returns bfloat16 [M, N].
// `isa` < 0: the process's path (k2serve_native::active_isa()); tests pass one to compare.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor mins,
                          int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat),
              "x: float32 or bfloat16 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kByte && packed.size(2) == kBlockBytes &&
                  packed.is_contiguous(), "packed weight");
  const int64_t M = x.size(0), K = x.size(1), G = packed.size(1), NB = packed.size(0);
  TORCH_CHECK(K == G * kGroup, "x has ", K, " columns, the weight ", G * kGroup);
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.numel() == NB * G * kCols &&
                  mins.numel() == NB * G * kCols && scales.scalar_type() == mins.scalar_type() &&
                  (scales.scalar_type() == torch::kFloat || scales.scalar_type() == torch::kHalf),
              "scales/mins: float32 or float16 [N / 16, K / 32, 16]");
  if (isa < 0) isa = k2serve_native::active_isa();
  TORCH_CHECK(isa <= k2serve_native::compiled_isa(), "that vector path is not built on this CPU");
  x = x.contiguous();
  auto out = torch::empty({M, NB * kCols}, x.options().dtype(torch::kBFloat16));
  if (M == 0) return out;
  auto codes = torch::empty({M, K}, x.options().dtype(torch::kShort));
  auto d = torch::empty({M, G}, x.options().dtype(torch::kFloat));
  auto dc = torch::empty({M, G}, x.options().dtype(torch::kFloat));
  if (x.scalar_type() == torch::kFloat)
    quantize_rows(x.data_ptr<float>(), M, K, codes.data_ptr<int16_t>(), d.data_ptr<float>(), dc.data_ptr<float>(),
                  static_cast<int>(isa));
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, codes.data_ptr<int16_t>(), d.data_ptr<float>(),
                  dc.data_ptr<float>(), static_cast<int>(isa));
  const QuantizedRows rows{codes.data_ptr<int16_t>(), d.data_ptr<float>(), dc.data_ptr<float>(), K, G};
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  if (scales.scalar_type() == torch::kHalf)
    run_blocks(rows, M, NB, wp, scales.data_ptr<at::Half>(), mins.data_ptr<at::Half>(), op, static_cast<int>(isa));
  else
    run_blocks(rows, M, NB, wp, scales.data_ptr<float>(), mins.data_ptr<float>(), op, static_cast<int>(isa));
  return out;
}
