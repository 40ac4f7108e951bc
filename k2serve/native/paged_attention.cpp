// Decode attention straight out of the paged KV pool: one query token per sequence, its keys
// and values read in place through the sequence's block table (no gather copy), grouped-query
// heads sharing each K/V row they read. float32 queries and outputs, a float32 or bfloat16
// pool (bfloat16 halves the bytes decode attention reads; rows are widened exactly on load),
// float32 accumulation.
//
// Work is split over (sequence, kv head) pairs with ATen's thread pool (the threads torch
// itself uses), so a sequence's result never depends on what else is in the batch.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "isa.h"
#include "vector_math.h"

namespace {

using at::BFloat16;

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return static_cast<float>(x); }

// Stores a float into the pool: bfloat16 rounds to nearest even, as Tensor.to() does.
inline void store(float* dst, float x) { *dst = x; }
inline void store(BFloat16* dst, float x) { *dst = BFloat16(x); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
// bfloat16 is the top half of a float32: widening is a 16-bit shift, exact.
inline __m512 load16(const BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float reduce8(__m256 v) {  // a fixed pairwise order
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#endif

// The vector path, chosen once per process (k2serve_native::active_isa): each head's
// arithmetic is the same whatever the batch.
template <typename T>
inline float dot(int isa, const float* a, const T* b, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  if (isa == k2serve_native::kAvx2 && n % 8 == 0) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
    }
    if (i < n) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    return reduce8(_mm256_add_ps(acc0, acc1));
  }
#endif
#if defined(__AVX512F__)
  if (isa >= k2serve_native::kAvx512 && n % 16 == 0) {  // head dims 64, 128, ...: two accumulators, one reduction at the end
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b + i + 16), acc1);
    }
    if (i < n) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
#endif
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * to_float(b[i]);
  return acc;
}

// exp(x) for x <= 0, in place (at 32 sequences x 300 positions x 9 heads x 30 layers a
// scalar exp was most of the step). Inputs below -87 give 0, as exp underflows there anyway.
inline void exp_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] < -87.f ? 0.f : k2serve_native::exp_vectorizable(x[i]);
}

template <typename T>
inline void axpy(int isa, float alpha, const T* x, float* y, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  if (isa == k2serve_native::kAvx2 && n % 8 == 0) {
    const __m256 a = _mm256_set1_ps(alpha);
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, load8(x + i), _mm256_loadu_ps(y + i)));
    return;
  }
#endif
#if defined(__AVX512F__)
  if (isa >= k2serve_native::kAvx512 && n % 16 == 0) {
    const __m512 a = _mm512_set1_ps(alpha);
    for (int64_t i = 0; i < n; i += 16)
      _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, load16(x + i), _mm512_loadu_ps(y + i)));
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * to_float(x[i]);
}

inline void softmax_inplace(float* row, int64_t len) {
  const float peak = *std::max_element(row, row + len);
  for (int64_t s = 0; s < len; ++s) row[s] -= peak;
  exp_inplace(row, len);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t s = 0; s < len; ++s) total += row[s];
  const float inv = 1.f / total;
  for (int64_t s = 0; s < len; ++s) row[s] *= inv;
}

#if defined(__AVX512F__)
// Head dim 64 fast paths, for NH (<= 4) query heads sharing one kv head: q and the output
// accumulators live in registers, each K or V row is loaded once for all NH heads. Every
// head's arithmetic is the same whichever NH it is computed with.
template <int NH, typename T>
void scores64(const float* q, const T* krow0, int64_t kstride, int64_t count, float scale,
              float* out, int64_t out_stride) {
  __m512 qv[NH][4];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) qv[h][c] = _mm512_loadu_ps(q + h * 64 + c * 16);
  for (int64_t i = 0; i < count; ++i) {
    const T* k = krow0 + i * kstride;
    const __m512 k0 = load16(k), k1 = load16(k + 16), k2 = load16(k + 32), k3 = load16(k + 48);
    for (int h = 0; h < NH; ++h) {
      const __m512 a = _mm512_fmadd_ps(qv[h][1], k1, _mm512_mul_ps(qv[h][0], k0));
      const __m512 b = _mm512_fmadd_ps(qv[h][3], k3, _mm512_mul_ps(qv[h][2], k2));
      out[h * out_stride + i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
    }
  }
}

template <int NH, typename T>
void weighted_sum64(const float* probs, int64_t prob_stride, const T* vrow0, int64_t vstride,
                    int64_t count, __m512 (&acc)[NH][4]) {
  for (int64_t i = 0; i < count; ++i) {
    const T* v = vrow0 + i * vstride;
    const __m512 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
    for (int h = 0; h < NH; ++h) {
      const __m512 p = _mm512_set1_ps(probs[h * prob_stride + i]);
      acc[h][0] = _mm512_fmadd_ps(p, v0, acc[h][0]);
      acc[h][1] = _mm512_fmadd_ps(p, v1, acc[h][1]);
      acc[h][2] = _mm512_fmadd_ps(p, v2, acc[h][2]);
      acc[h][3] = _mm512_fmadd_ps(p, v3, acc[h][3]);
    }
  }
}

// NH query heads of one kv head over a sequence's blocks: scores, softmax, weighted sum.
template <int NH, typename T>
void attend64(const float* q, const T* kbase, int64_t ks0, const T* vbase, int64_t vs0,
              const int64_t* table, int64_t block_size, int64_t len, float scale,
              float* scores, float* out) {
  for (int64_t s0 = 0; s0 < len; s0 += block_size) {
    const int64_t block = table[s0 / block_size] * block_size;
    scores64<NH, T>(q, kbase + block * ks0, ks0, std::min(block_size, len - s0), scale, scores + s0, len);
  }
  for (int h = 0; h < NH; ++h) softmax_inplace(scores + h * len, len);
  __m512 acc[NH][4];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t s0 = 0; s0 < len; s0 += block_size) {
    const int64_t block = table[s0 / block_size] * block_size;
    weighted_sum64<NH, T>(scores + s0, len, vbase + block * vs0, vs0, std::min(block_size, len - s0), acc);
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + h * 64 + c * 16, acc[h][c]);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// The probability-weighted sum of V for NH (<= 3) heads of one kv head, head dim 64, a half
// (32 dims) at a time: each V row is loaded and widened once for the NH heads (4 vectors
// + NH x 4 accumulators fit the 16 registers) instead of once per head. Each head's output
// element is the same chain of FMAs over the positions in order as one head alone computes.
template <int NH, typename T>
void weighted_sum64_avx2(const float* probs, int64_t len, const T* vbase, int64_t vs0,
                         const int64_t* table, int64_t block_size, float* out) {
  for (int half = 0; half < 2; ++half) {
    __m256 acc[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int64_t s0 = 0; s0 < len; s0 += block_size) {
      const int64_t count = std::min(block_size, len - s0);
      const T* vblock = vbase + table[s0 / block_size] * block_size * vs0 + half * 32;
      for (int64_t i = 0; i < count; ++i) {
        const T* v = vblock + i * vs0;
        const __m256 v0 = load8(v), v1 = load8(v + 8), v2 = load8(v + 16), v3 = load8(v + 24);
        for (int h = 0; h < NH; ++h) {
          const __m256 p = _mm256_set1_ps(probs[h * len + s0 + i]);
          acc[h][0] = _mm256_fmadd_ps(p, v0, acc[h][0]);
          acc[h][1] = _mm256_fmadd_ps(p, v1, acc[h][1]);
          acc[h][2] = _mm256_fmadd_ps(p, v2, acc[h][2]);
          acc[h][3] = _mm256_fmadd_ps(p, v3, acc[h][3]);
        }
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + h * 64 + half * 32 + c * 8, acc[h][c]);
  }
}

// Head dim 64 on the AVX2 path, for the nh query heads sharing one kv head: each K and V
// row is loaded once into registers for all nh heads (q stays in L1), and each head's
// output is accumulated in registers over the whole sequence instead of a load and store of
// the output row per position. Each head's arithmetic is fixed: the same whatever nh, the
// batch or the rows computed with it (prompt rows run this kernel too).
template <typename T>
void attend64_avx2(const float* q, int64_t nh, const T* kbase, int64_t ks0, const T* vbase,
                   int64_t vs0, const int64_t* table, int64_t block_size, int64_t len,
                   float scale, float* scores, float* out) {
  for (int64_t s0 = 0; s0 < len; s0 += block_size) {
    const int64_t count = std::min(block_size, len - s0);
    const T* kblock = kbase + table[s0 / block_size] * block_size * ks0;
    for (int64_t i = 0; i < count; ++i) {
      const T* k = kblock + i * ks0;
      __m256 kv[8];
      for (int c = 0; c < 8; ++c) kv[c] = load8(k + c * 8);
      for (int64_t h = 0; h < nh; ++h) {
        const float* qh = q + h * 64;
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qh), kv[0]);
        __m256 b = _mm256_mul_ps(_mm256_loadu_ps(qh + 8), kv[1]);
        for (int c = 2; c < 8; c += 2) {
          a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c * 8), kv[c], a);
          b = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c * 8 + 8), kv[c + 1], b);
        }
        scores[h * len + s0 + i] = reduce8(_mm256_add_ps(a, b)) * scale;
      }
    }
  }
  for (int64_t h = 0; h < nh; ++h) softmax_inplace(scores + h * len, len);
  int64_t h = 0;
  for (; h + 3 <= nh; h += 3) weighted_sum64_avx2<3>(scores + h * len, len, vbase, vs0, table, block_size, out + h * 64);
  switch (nh - h) {
    case 2: weighted_sum64_avx2<2>(scores + h * len, len, vbase, vs0, table, block_size, out + h * 64); break;
    case 1: weighted_sum64_avx2<1>(scores + h * len, len, vbase, vs0, table, block_size, out + h * 64); break;
    default: break;
  }
}
#endif

// The kernel for one pool element type T (float or BFloat16); see paged_decode_attention.
template <typename T>
void decode_attention(const float* qp, const T* kp, const T* vp, const int64_t* tables,
                      const int64_t* lens, float* op, int64_t B, int64_t H, int64_t D, int64_t KV,
                      int64_t Dv, int64_t max_blocks, int64_t block_size, int64_t ks0, int64_t ks1,
                      int64_t vs0, int64_t vs1, float fscale) {
  const int64_t G = H / KV;
  const int isa = k2serve_native::active_isa();
  // One work item is a sequence's kv heads [h0, h1): all of them when there are enough
  // sequences to keep the threads busy (each slot's K and V rows are then read once, whole
  // and in order), one per item otherwise. Each head's arithmetic is the same either way.
  const int64_t heads_per_item = B >= at::get_num_threads() ? KV : 1;
  const int64_t items_per_seq = KV / heads_per_item;
  at::parallel_for(0, B * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / items_per_seq;
      const int64_t h0 = (item % items_per_seq) * heads_per_item, h1 = h0 + heads_per_item;
      const int64_t len = lens[b];
      TORCH_CHECK(len >= 1 && len <= max_blocks * block_size, "bad sequence length");
      const int64_t* table = tables + b * max_blocks;
      const int64_t rows = (h1 - h0) * G;  // query heads of this item; row j is head h0 * G + j
      const float* qi = qp + (b * H + h0 * G) * D;
      float* oi = op + (b * H + h0 * G) * Dv;
      scores.resize(rows * len);
#if defined(__AVX512F__)
      if (isa >= k2serve_native::kAvx512 && D == 64 && Dv == 64) {
        for (int64_t kvh = h0; kvh < h1; ++kvh)
          for (int64_t g = 0; g < G; g += 4) {  // up to 4 query heads at a time
            const int64_t j = (kvh - h0) * G + g, nh = std::min<int64_t>(4, G - g);
            const T* kb = kp + kvh * ks1;
            const T* vb = vp + kvh * vs1;
            float* sc = scores.data() + j * len;
            switch (nh) {
              case 4: attend64<4, T>(qi + j * D, kb, ks0, vb, vs0, table, block_size, len, fscale, sc, oi + j * Dv); break;
              case 3: attend64<3, T>(qi + j * D, kb, ks0, vb, vs0, table, block_size, len, fscale, sc, oi + j * Dv); break;
              case 2: attend64<2, T>(qi + j * D, kb, ks0, vb, vs0, table, block_size, len, fscale, sc, oi + j * Dv); break;
              default: attend64<1, T>(qi + j * D, kb, ks0, vb, vs0, table, block_size, len, fscale, sc, oi + j * Dv); break;
            }
          }
        continue;
      }
#endif
#if defined(__AVX2__) && defined(__FMA__)
      if (isa == k2serve_native::kAvx2 && D == 64 && Dv == 64) {
        for (int64_t kvh = h0; kvh < h1; ++kvh) {
          const int64_t j = (kvh - h0) * G;
          attend64_avx2<T>(qi + j * D, G, kp + kvh * ks1, ks0, vp + kvh * vs1, vs0, table,
                           block_size, len, fscale, scores.data() + j * len, oi + j * Dv);
        }
        continue;
      }
#endif
      // positions block by block: a block's slots are consecutive rows of the pool
      for (int64_t s0 = 0; s0 < len; s0 += block_size) {
        const int64_t count = std::min(block_size, len - s0);
        const T* kblock = kp + table[s0 / block_size] * block_size * ks0;
        for (int64_t i = 0; i < count; ++i)
          for (int64_t j = 0; j < rows; ++j)
            scores[j * len + s0 + i] = dot(isa, qi + j * D, kblock + i * ks0 + (h0 + j / G) * ks1, D) * fscale;
      }
      for (int64_t j = 0; j < rows; ++j) softmax_inplace(scores.data() + j * len, len);
      for (int64_t s0 = 0; s0 < len; s0 += block_size) {
        const int64_t count = std::min(block_size, len - s0);
        const T* vblock = vp + table[s0 / block_size] * block_size * vs0;
        for (int64_t i = 0; i < count; ++i)
          for (int64_t j = 0; j < rows; ++j)
            axpy(isa, scores[j * len + s0 + i], vblock + i * vs0 + (h0 + j / G) * vs1, oi + j * Dv, Dv);
      }
    }
  });
}

// RoPE'd q out, k and v into their pool slots, for the decode rows (see
// decode_rotary_attention).
template <typename T>
void rotary_write(const float* rp, const float* cp, const float* sp, const int64_t* slot,
                  float* qp, T* kp, T* vp, int64_t B, int64_t H, int64_t KV, int64_t D) {
  const int64_t half = D / 2, width = (H + 2 * KV) * D;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* row = rp + b * width;
      const float* c = cp + b * D;
      const float* sn = sp + b * D;
      auto rope = [&](const float* t, auto* dst) {
        for (int64_t i = 0; i < D; ++i) {
          const float rolled = t[i < half ? i + half : i - half];
          store(dst + i, std::fma(rolled, sn[i], t[i] * c[i]));  // as torch.addcmul computes it
        }
      };
      for (int64_t h = 0; h < H; ++h) rope(row + h * D, qp + (b * H + h) * D);
      for (int64_t h = 0; h < KV; ++h) rope(row + (H + h) * D, kp + slot[b] * KV * D + h * D);
      T* v = vp + slot[b] * KV * D;
      for (int64_t i = 0; i < KV * D; ++i) store(v + i, row[(H + KV) * D + i]);
    }
  });
}

}  // namespace

// q: [B, H, D] float32; k_pool: [slots, KV, D] float32 or bfloat16 (last dim contiguous);
// v_pool: [slots, KV, Dv] of the same dtype with any row strides (a view of k_pool's leading
// Dv dims when values live in the keys, as in MLA); block_tables: [B, max_blocks] int64 block ids; seq_lens: [B] int64 (tokens to attend,
// the new one included, its K/V already written). Returns [B, H, Dv] float32.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.dim() == 3, "bad ranks");
  const auto pool_dtype = k_pool.scalar_type();
  TORCH_CHECK(q.scalar_type() == torch::kFloat && v_pool.scalar_type() == pool_dtype &&
                  (pool_dtype == torch::kFloat || pool_dtype == torch::kBFloat16),
              "float32 queries, float32 or bfloat16 pools");
  TORCH_CHECK(k_pool.stride(2) == 1 && v_pool.stride(2) == 1, "pool rows must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.to(torch::kLong).contiguous();
  seq_lens = seq_lens.to(torch::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KV = k_pool.size(1), Dv = v_pool.size(2);
  TORCH_CHECK(k_pool.size(2) == D && H % KV == 0 && v_pool.size(1) == KV, "shape mismatch");
  auto out = torch::zeros({B, H, Dv}, q.options());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  auto run = [&](auto* kp, auto* vp) {
    decode_attention(q.data_ptr<float>(), kp, vp, tables, lens, out.data_ptr<float>(), B, H, D,
                     KV, Dv, block_tables.size(1), block_size, k_pool.stride(0),
                     k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
                     static_cast<float>(scale));
  };
  if (pool_dtype == torch::kFloat)
    run(k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
  else
    run(k_pool.data_ptr<BFloat16>(), v_pool.data_ptr<BFloat16>());
  return out;
}

// The decode rows of a Llama-style layer in one call: RoPE on q and k straight from the
// fused qkv projection's output, k and v written into their pool slots, then
// paged_decode_attention. qkv: [B, (H + 2 KV) * D], bfloat16 or float32; the pools float32
// or bfloat16 (k and v rounded to nearest even, as Tensor.to() does); cos, sin_signed:
// [B, D] float32 (sin with its first half negated). RoPE is fma(roll(q, D/2), sin, q*cos),
// bitwise what the PyTorch path (torch.addcmul(q * cos, q.roll(D/2), sin)) computes for
// prefill rows, so a token's cached K does not depend on which path computed it
// (preemption recomputes generated tokens as a prefill). Built with -ffp-contract=off so the
// compiler fuses nothing on its own.
torch::Tensor decode_rotary_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin_signed,
                                      torch::Tensor k_pool, torch::Tensor v_pool,
                                      torch::Tensor slots, torch::Tensor block_tables,
                                      torch::Tensor seq_lens, int64_t block_size, double scale,
                                      int64_t num_heads, int64_t num_kv_heads) {
  const int64_t B = qkv.size(0), H = num_heads, KV = num_kv_heads, D = k_pool.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (H + 2 * KV) * D, "qkv shape");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin_signed.scalar_type() == torch::kFloat &&
                  cos.size(0) == B && cos.size(1) == D, "cos/sin shape or dtype");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && v_pool.size(2) == D, "pools");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() &&
                  (k_pool.scalar_type() == torch::kFloat || k_pool.scalar_type() == torch::kBFloat16),
              "float32 or bfloat16 pools");
  TORCH_CHECK(D % 2 == 0, "odd head dim");
  auto rows = qkv.to(torch::kFloat).contiguous();
  cos = cos.contiguous();
  sin_signed = sin_signed.contiguous();
  slots = slots.to(torch::kLong).contiguous();
  auto q = torch::empty({B, H, D}, rows.options());
  const float* rp = rows.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin_signed.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  if (k_pool.scalar_type() == torch::kFloat)
    rotary_write(rp, cp, sp, slot, q.data_ptr<float>(), k_pool.data_ptr<float>(),
                 v_pool.data_ptr<float>(), B, H, KV, D);
  else
    rotary_write(rp, cp, sp, slot, q.data_ptr<float>(), k_pool.data_ptr<BFloat16>(),
                 v_pool.data_ptr<BFloat16>(), B, H, KV, D);
  return paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens, block_size, scale);
}
