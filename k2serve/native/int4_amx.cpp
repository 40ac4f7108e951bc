// y = x @ W^T with W in 4-bit groups of 32 (w = scale * q + min, q in 0..15, a scale and min
// per group and output column: GGUF's Q4_0, Q4_1 and Q4_K all have this form), on Intel AMX
// tiles.
//
// Per group g the tiles compute C_g = x_g @ (16 + q_g)^T: bfloat16 activations times
// integers 16..31, which bfloat16 holds exactly (their bits are 0x4180 | q << 3: widening a
// code is a shift and a mask-or), so every product is exact and only the float32 sums round.
// The epilogue adds scale * C_g + (min - 16 scale) * sum(x_g) per column, in float32. (The
// offset keeps every code in one binade; 16 is the smallest such, which keeps the float32
// sums' error, and the cancellation of the offset, small: measured <= 3e-4 of |x| @ |W|^T,
// under the 2^-9 of rounding x to bfloat16; with 128 + q it was 4x that.) Scales and mins
// are kept float16 when that holds them exactly (Q4_0 and Q4_1 store float16), else float32:
// at one decode row the kernel is bound by the bytes it reads.
// A row's arithmetic never looks at another row, so its result is bitwise the same at any
// M (the engine's batch invariance): one kernel serves a single decode row and 500-row steps.
//
// Weight layout (int4_amx_pack): per block of 16 output columns and group of 32 inputs, 256
// bytes: 8 chunks of 32 bytes, chunk j holding B-tile row j in its low nibbles and row j + 8
// in its high nibbles. A B-tile row is AMX's pair-interleaved layout: element 2c + i is
// q[column c][input 2 * row + i].

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define K2SERVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kGroup = 32;     // inputs per group: one tile's K
constexpr int64_t kCols = 16;      // output columns per block: one tile's N
constexpr int64_t kTileRows = 16;  // activation rows per tile
constexpr int64_t kBlockBytes = kGroup * kCols / 2;
constexpr int64_t kLag = 3;        // groups widened ahead of the tiles (see amx_linear)
constexpr int64_t kPrefetch = 16;  // groups of weights requested ahead of their use

#if defined(K2SERVE_AMX)
// Linux hands AMX's 8 KB tile state to a process only on request (arch_prctl).
bool request_amx() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool amx_ready() {
  static const bool ready = request_amx();
  return ready;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0/tmm1: C of the first/second 16-row tile; tmm2: B; tmm3/tmm4: A of the two tiles.
void configure(int64_t rows0, int64_t rows1) {
  TileConfig cfg;
  auto set = [&](int tile, int64_t rows, int64_t bytes) {
    cfg.rows[tile] = static_cast<uint8_t>(rows);
    cfg.colsb[tile] = static_cast<uint16_t>(bytes);
  };
  set(0, rows0, kCols * 4);
  set(3, rows0, kGroup * 2);
  set(2, kGroup / 2, kCols * 4);
  if (rows1 > 0) {
    set(1, rows1, kCols * 4);
    set(4, rows1, kGroup * 2);
  }
  _tile_loadconfig(&cfg);
}

// The 16 B-tile rows (bfloat16 16 + q) of a block's 256 packed bytes.
inline void unpack_block(const uint8_t* src, uint16_t* dst) {
  const __m512i mask = _mm512_set1_epi16(0x78), bias = _mm512_set1_epi16(0x4180);
  for (int j = 0; j < kGroup / 4; ++j) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j * 32)));
    // ((b << 3) & 0x78) | bias and ((b >> 1) & 0x78) | bias: the low and high nibble, << 3
    _mm512_store_si512(dst + j * 32, _mm512_ternarylogic_epi32(_mm512_slli_epi16(bytes, 3), mask, bias, 0xEA));
    _mm512_store_si512(dst + (j + 8) * 32, _mm512_ternarylogic_epi32(_mm512_srli_epi16(bytes, 1), mask, bias, 0xEA));
  }
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// acc[m] += scale * C[m] + zero * xsum[m] for the rows of one tile.
inline void accumulate(const float* c, int64_t rows, __m512 scale, __m512 zero,
                       const float* xsum, int64_t xsum_stride, float* acc) {
  for (int64_t m = 0; m < rows; ++m) {
    __m512 a = _mm512_loadu_ps(acc + m * kCols);
    a = _mm512_fmadd_ps(scale, _mm512_load_ps(c + m * kCols), a);
    a = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[m * xsum_stride]), a);
    _mm512_storeu_ps(acc + m * kCols, a);
  }
}

// The kernel for one scale type S (float or at::Half); see int4_amx_linear.
//
// B tiles are widened kLag groups ahead into a ring of buffers, and a group's epilogue runs
// one group later from a second C buffer: a tile load of data that vector stores have just
// written (or a vector load of a tile store's data) waits for those stores to retire. Ahead,
// a one-row step measured ~10% faster. Groups still reach a row's accumulator in order
// 0, 1, 2, ..., whatever M is.
template <typename S>
void amx_linear(const uint16_t* xp, const float* xs, const uint8_t* wp, const S* sp, const S* mp,
                uint16_t* op, int64_t M, int64_t K, int64_t G, int64_t NB) {
  const int64_t N = NB * kCols;
  constexpr int64_t kTile = kTileRows * kCols;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint16_t ring[kLag + 1][kGroup * kCols];
    alignas(64) float cbuf[2][2][kTile];  // [group parity][row tile]
    std::vector<float> acc(M * kCols);
    int64_t configured = -1;
    const __m512 minus16 = _mm512_set1_ps(-16.f);
    for (int64_t nb = begin; nb < end; ++nb) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint8_t* wb = wp + nb * G * kBlockBytes;
      const S* sb = sp + nb * G * kCols;
      const S* mb = mp + nb * G * kCols;
      for (int64_t m0 = 0; m0 < M; m0 += 2 * kTileRows) {
        const int64_t rows0 = std::min(kTileRows, M - m0);
        const int64_t rows1 = std::min(kTileRows, std::max<int64_t>(0, M - m0 - kTileRows));
        if (rows0 * 32 + rows1 != configured) {
          configure(rows0, rows1);
          configured = rows0 * 32 + rows1;
        }
        const uint16_t* x0 = xp + m0 * K;
        const uint16_t* x1 = x0 + kTileRows * K;
        float* acc0 = acc.data() + m0 * kCols;
        float* acc1 = acc0 + kTileRows * kCols;
        const float* xs0 = xs + m0 * G;
        const float* xs1 = xs0 + kTileRows * G;
        auto epilogue = [&](int64_t g) {
          const __m512 scale = load16(sb + g * kCols);
          const __m512 zero = _mm512_fmadd_ps(minus16, scale, load16(mb + g * kCols));
          accumulate(cbuf[g & 1][0], rows0, scale, zero, xs0 + g, G, acc0);
          if (rows1 > 0) accumulate(cbuf[g & 1][1], rows1, scale, zero, xs1 + g, G, acc1);
        };
        for (int64_t g = 0; g < std::min(kLag, G); ++g) unpack_block(wb + g * kBlockBytes, ring[g]);
        for (int64_t g = 0; g < G; ++g) {
          if (g + kLag < G) {
            _mm_prefetch(reinterpret_cast<const char*>(wb + (g + kPrefetch) * kBlockBytes), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wb + (g + kPrefetch) * kBlockBytes + 128), _MM_HINT_T0);
            unpack_block(wb + (g + kLag) * kBlockBytes, ring[(g + kLag) % (kLag + 1)]);
          }
          _tile_loadd(2, ring[g % (kLag + 1)], kCols * 4);
          _tile_zero(0);
          _tile_loadd(3, x0 + g * kGroup, K * 2);
          _tile_dpbf16ps(0, 3, 2);
          _tile_stored(0, cbuf[g & 1][0], kCols * 4);
          if (rows1 > 0) {
            _tile_zero(1);
            _tile_loadd(4, x1 + g * kGroup, K * 2);
            _tile_dpbf16ps(1, 4, 2);
            _tile_stored(1, cbuf[g & 1][1], kCols * 4);
          }
          if (g > 0) epilogue(g - 1);
        }
        epilogue(G - 1);
      }
      for (int64_t m = 0; m < M; ++m) {
        const __m256i bf = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(acc.data() + m * kCols)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + m * N + nb * kCols), bf);
      }
    }
    _tile_release();
  });
}
#endif

}  // namespace

bool int4_amx_available() {
#if defined(K2SERVE_AMX)
  return amx_ready();
#else
  return false;
#endif
}

// q: uint8 [N, K] codes 0..15; scale, min: float32 [N, K / 32] (w = scale * q + min).
// Returns (packed uint8 [N / 16, K / 32, 256], scales [N / 16, K / 32, 16], mins likewise),
// scales and mins float16 when that is exact for every one of them, else float32.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> int4_amx_pack(torch::Tensor q, torch::Tensor scale,
                                                                      torch::Tensor min) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kByte, "q: uint8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1), G = K / kGroup;
  TORCH_CHECK(N % kCols == 0 && K % kGroup == 0, "N must be a multiple of 16, K of 32");
  TORCH_CHECK(scale.sizes() == min.sizes() && scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G,
              "scale/min: [N, K / 32]");
  TORCH_CHECK(N == 0 || q.max().item<int>() < 16, "q: codes 0..15");
  // [N/16, 16 cols, G, 2 halves, 8 rows, 2 pair] -> [N/16, G, 8 rows, 16 cols, 2 pair, 2 halves]
  auto codes = q.contiguous().view({N / kCols, kCols, G, 2, kGroup / 4, 2}).permute({0, 2, 4, 1, 5, 3}).contiguous();
  auto packed = codes.select(-1, 0).bitwise_or(codes.select(-1, 1).bitwise_left_shift(4));
  auto blocks = [&](torch::Tensor t) {
    return t.to(torch::kFloat).view({N / kCols, kCols, G}).permute({0, 2, 1}).contiguous();
  };
  auto scales = blocks(scale), mins = blocks(min);
  auto exact_half = [](const torch::Tensor& t) { return t.to(torch::kHalf).to(torch::kFloat).equal(t); };
  if (exact_half(scales) && exact_half(mins)) {
    scales = scales.to(torch::kHalf);
    mins = mins.to(torch::kHalf);
  }
  return {packed.view({N / kCols, G, kBlockBytes}).contiguous(), scales, mins};
}

// x: bfloat16 [M, K]; the packed weight from int4_amx_pack. Returns bfloat16 [M, N].
torch::Tensor int4_amx_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                              torch::Tensor mins) {
#if defined(K2SERVE_AMX)
  TORCH_CHECK(amx_ready(), "AMX is not available to this process");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x: bfloat16 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kByte && packed.size(2) == kBlockBytes &&
                  packed.is_contiguous(), "packed weight");
  const int64_t M = x.size(0), K = x.size(1), G = packed.size(1), NB = packed.size(0);
  TORCH_CHECK(K == G * kGroup, "x has ", K, " columns, the weight ", G * kGroup);
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.numel() == NB * G * kCols &&
                  mins.numel() == NB * G * kCols && scales.scalar_type() == mins.scalar_type() &&
                  (scales.scalar_type() == torch::kFloat || scales.scalar_type() == torch::kHalf),
              "scales/mins: float32 or float16 [N / 16, K / 32, 16]");
  x = x.contiguous();
  auto out = torch::empty({M, NB * kCols}, x.options());
  if (M == 0) return out;
  // the sum of each row's group of x, in float32, in one fixed order
  auto xsum = torch::empty({M, G}, x.options().dtype(torch::kFloat));
  float* xs = xsum.data_ptr<float>();
  const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * G; ++i) {
    float total = 0.f;
    for (int64_t k = 0; k < kGroup; ++k) total += static_cast<float>(xb[i * kGroup + k]);
    xs[i] = total;
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb);
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  if (scales.scalar_type() == torch::kHalf)
    amx_linear(xp, xs, wp, scales.data_ptr<at::Half>(), mins.data_ptr<at::Half>(), op, M, K, G, NB);
  else
    amx_linear(xp, xs, wp, scales.data_ptr<float>(), mins.data_ptr<float>(), op, M, K, G, NB);
  return out;
#else
  TORCH_CHECK(false, "built without AMX");
  return x;
#endif
}
