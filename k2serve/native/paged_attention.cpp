// Decode attention straight out of the paged KV pool: one query token per sequence, its keys
// and values read in place through the sequence's block table (no gather copy), grouped-query
// heads sharing each K/V row they read. float32 in, float32 out, float32 accumulation.
//
// Work is split over (sequence, kv head) pairs with ATen's thread pool (the threads torch
// itself uses), so a sequence's result never depends on what else is in the batch.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// q: [B, H, D]; k_pool: [slots, KV, D] (last dim contiguous); v_pool: [slots, KV, Dv] with
// any row strides (a view of k_pool's leading Dv dims when values live in the keys, as in
// MLA); block_tables: [B, max_blocks] int64 block ids; seq_lens: [B] int64 (tokens to attend,
// the new one included, its K/V already written). Returns [B, H, Dv].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.dim() == 3, "bad ranks");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k_pool.scalar_type() == torch::kFloat &&
                  v_pool.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(k_pool.stride(2) == 1 && v_pool.stride(2) == 1, "pool rows must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.to(torch::kLong).contiguous();
  seq_lens = seq_lens.to(torch::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KV = k_pool.size(1), Dv = v_pool.size(2);
  TORCH_CHECK(k_pool.size(2) == D && H % KV == 0 && v_pool.size(1) == KV, "shape mismatch");
  const int64_t G = H / KV;
  const int64_t max_blocks = block_tables.size(1);
  auto out = torch::zeros({B, H, Dv}, q.options());

  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t ks0 = k_pool.stride(0), ks1 = k_pool.stride(1);
  const int64_t vs0 = v_pool.stride(0), vs1 = v_pool.stride(1);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KV, kvh = item % KV;
      const int64_t len = lens[b];
      TORCH_CHECK(len >= 1 && len <= max_blocks * block_size, "bad sequence length");
      const int64_t* table = tables + b * max_blocks;
      const float* qg = qp + (b * H + kvh * G) * D;  // the G query heads of this kv head
      scores.assign(G * len, 0.f);
      for (int64_t s = 0; s < len; ++s) {
        const int64_t slot = table[s / block_size] * block_size + s % block_size;
        const float* krow = kp + slot * ks0 + kvh * ks1;
        for (int64_t g = 0; g < G; ++g) scores[g * len + s] = dot(qg + g * D, krow, D) * fscale;
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax per query head
        float* row = scores.data() + g * len;
        const float peak = *std::max_element(row, row + len);
        float total = 0.f;
        for (int64_t s = 0; s < len; ++s) total += (row[s] = std::exp(row[s] - peak));
        const float inv = 1.f / total;
        for (int64_t s = 0; s < len; ++s) row[s] *= inv;
      }
      float* og = op + (b * H + kvh * G) * Dv;
      for (int64_t s = 0; s < len; ++s) {
        const int64_t slot = table[s / block_size] * block_size + s % block_size;
        const float* vrow = vp + slot * vs0 + kvh * vs1;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * len + s], vrow, og + g * Dv, Dv);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV pool (float32)");
}
