"""The int4 linear kernels side by side: ours (AMX tiles, int4_amx.cpp, where the CPU has
AMX; else integer dots on AVX-512 / AVX2, int4_linear.cpp) and torch's
`_weight_int4pack_mm_for_cpu`, on every 4-bit projection of the embedded SmolLM2 (the 210 of
its 30 layers, q/k/v and gate/up unfused, in model order, so weights stream from memory as in
a decode step), against what this machine can do: a STREAM-like read-bandwidth test (sum of
a 512 MB buffer) and a peak-FMA test (independent float32 FMA chains in registers), both on
the same threads.

    python benchmarks/int4_kernels.py [--rows 1 4 8 16 32 64] [--repeat 5] [--threads 2]
                                      [--isa avx2|portable]

Prints per M (rows: tokens in the step) the median time of one pass over all of them for
each kernel, alternating kernels within each repeat, the ratio, the bytes read per second
(4-bit weights and their scales) at M = 1 and the multiply-adds per second (2 flops each) at
every M, each as a share of the measured bandwidth / FMA peak. (Ours at M >= 32 runs 16-bit
integer multiply-adds, twice float32 FMA's rate per instruction on AVX2: it can pass the
float32 peak.) --isa forces our kernels' vector path (as K2SERVE_ISA does). --clock cpu times
by the process's CPU time instead of the wall clock: on a machine shared with other work,
use it with --threads 1 for per-core figures that the other work hardly moves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2serve import native  # noqa: E402
from k2serve.models.embedded import embedded_smollm2_gguf_path  # noqa: E402
from k2serve.models.layers.int4_linear import INT4_ACT_DTYPE, pack_int4  # noqa: E402
from k2serve.models.loaders.gguf import GGUFCheckpoint  # noqa: E402

PROBES = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// Sum of a buffer's floats, each thread a contiguous slice, 4 vector accumulators: bound by reads.
#if defined(__AVX512F__)
typedef __m512 R;
#define RLOAD _mm512_loadu_ps
#define RADD _mm512_add_ps
#define RZERO _mm512_setzero_ps
#define RLANES 16
#else
typedef __m256 R;
#define RLOAD _mm256_loadu_ps
#define RADD _mm256_add_ps
#define RZERO _mm256_setzero_ps
#define RLANES 8
#endif
double read_sum(torch::Tensor buffer) {
  const float* p = buffer.data_ptr<float>();
  const int64_t n = buffer.numel(), threads = at::get_num_threads();
  std::vector<double> partial(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = n * t / threads / (4 * RLANES) * (4 * RLANES);
      const int64_t hi = n * (t + 1) / threads / (4 * RLANES) * (4 * RLANES);
      R a0 = RZERO(), a1 = RZERO(), a2 = RZERO(), a3 = RZERO();
      for (int64_t i = lo; i < hi; i += 4 * RLANES) {
        a0 = RADD(a0, RLOAD(p + i));
        a1 = RADD(a1, RLOAD(p + i + RLANES));
        a2 = RADD(a2, RLOAD(p + i + 2 * RLANES));
        a3 = RADD(a3, RLOAD(p + i + 3 * RLANES));
      }
      float out[RLANES];
      R s = RADD(RADD(a0, a1), RADD(a2, a3));
      memcpy(out, &s, sizeof(out));
      for (int j = 0; j < RLANES; ++j) partial[t] += out[j];
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

// float32 FMAs: 10 independent chains per thread (covers FMA latency x 2 pipes), widest vectors.
#if defined(__AVX512F__)
typedef __m512 V;
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SET(x) _mm512_set1_ps(x)
#define LANES 16
#else
typedef __m256 V;
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SET(x) _mm256_set1_ps(x)
#define LANES 8
#endif
double fma_flops(int64_t iterations) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> sink(threads);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      V a[10];
      for (int j = 0; j < 10; ++j) a[j] = SET(1.f + j * 1e-3f);
      const V b = SET(0.999999f), c = SET(1e-7f);
      for (int64_t i = 0; i < iterations; ++i)
        for (int j = 0; j < 10; ++j) a[j] = FMA(a[j], b, c);
      float out[LANES];
      V s = a[0];
      for (int j = 1; j < 10; ++j) s = FMA(s, b, a[j]);
      memcpy(out, &s, sizeof(out));
      sink[t] = out[0];
    }
  });
  return double(threads) * iterations * 10 * LANES * 2;  // flops done
}
"""


def machine_probes(threads: int, clock=time.perf_counter) -> tuple[float, float]:
    """(read GB/s, float32 FMA GFLOP/s) on `threads` threads, medians of 5."""
    from torch.utils.cpp_extension import load_inline

    probes = load_inline("k2serve_bench_probes", PROBES, functions=["read_sum", "fma_flops"],
                         extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    buffer = torch.ones(128 << 20)  # 512 MB: far beyond any cache
    reads, flops = [], []
    for _ in range(5):
        start = clock()
        probes.read_sum(buffer)
        reads.append(buffer.nbytes / (clock() - start) / 1e9)
        start = clock()
        done = probes.fma_flops(20_000_000)
        flops.append(done / (clock() - start) / 1e9)
    return statistics.median(reads), statistics.median(flops)

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def load_linears(kernels):
    """[(in_features, ours (packed, scales, mins), torch's (packed, scale_zeros), our bytes,
    torch's bytes, multiply-adds per row)] for every projection, in model order."""
    checkpoint = GGUFCheckpoint(embedded_smollm2_gguf_path())
    layers = []
    for i in range(checkpoint.config.num_layers):
        for projection in PROJECTIONS:
            qt = checkpoint.load_tensor(f"model.layers.{i}.{projection}.weight", keep_quantized=True)
            q, scale, minimum = qt.int4_affine()
            ours = kernels.int4_amx_pack(q, scale, minimum)
            theirs = pack_int4(q, scale, minimum + 8 * scale)
            layers.append((q.shape[1], ours, theirs, sum(t.nbytes for t in ours), sum(t.nbytes for t in theirs),
                           q.shape[0] * q.shape[1]))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", help="force our kernels' vector path (avx2, portable, ...)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.isa:
        os.environ[native.ISA_ENV] = args.isa
    torch.set_num_threads(args.threads)
    kernels = native.kernels()
    path = native.int4_path()
    if path is None:
        sys.exit("our int4 kernels do not run here (no native build, or no AVX2): nothing to compare")
    linear = kernels.int4_amx_linear if path == "amx" else kernels.int4_linear
    bandwidth, peak = machine_probes(args.threads, clock)
    print(f"machine ({args.threads} threads): read {bandwidth:.1f} GB/s, float32 FMA peak {peak:.0f} GFLOP/s"
          f" | ours: {path} | {args.clock} clock")
    layers = load_linears(kernels)
    ours_bytes = sum(layer[3] for layer in layers)
    theirs_bytes = sum(layer[4] for layer in layers)
    macs = sum(layer[5] for layer in layers)
    print(f"{len(layers)} linears; bytes a pass reads: ours {ours_bytes / 1e6:.1f} MB, torch's {theirs_bytes / 1e6:.1f} MB;"
          f" {args.threads} threads, median of {args.repeat}")
    print(f"{'M':>4} {'ours ms':>9} {'torch ms':>9} {'ratio':>7} {'ours GFLOP/s':>13} {'torch GFLOP/s':>14}")
    for m in args.rows:
        act = INT4_ACT_DTYPE if path == "amx" else torch.float32  # what each layer is handed
        xs = [torch.randn(m, k) for k, *_ in layers]
        xs_ours = [x.to(act) for x in xs]
        xs_torch = [x.to(INT4_ACT_DTYPE) for x in xs]

        def ours():
            for (_, (packed, scales, mins), *_), x in zip(layers, xs_ours):
                linear(x, packed, scales, mins)

        def theirs():
            for (_, _, (packed, scale_zeros), *_), x in zip(layers, xs_torch):
                torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scale_zeros)

        times = {"ours": [], "torch": []}
        for _ in range(args.repeat):
            for name, fn in (("ours", ours), ("torch", theirs)):
                fn()
                start = clock()
                fn()
                times[name].append(clock() - start)
        a, b = statistics.median(times["ours"]), statistics.median(times["torch"])
        fa, fb = 2 * m * macs / a / 1e9, 2 * m * macs / b / 1e9
        line = (f"{m:>4} {a * 1e3:>9.2f} {b * 1e3:>9.2f} {b / a:>6.2f}x {fa:>7.1f} ({fa / peak:>3.0%})"
                f" {fb:>7.1f} ({fb / peak:>3.0%})")
        if m == 1:
            line += (f"   GB/s: ours {ours_bytes / a / 1e9:.1f} ({ours_bytes / a / 1e9 / bandwidth:.0%} of read),"
                     f" torch's {theirs_bytes / b / 1e9:.1f} ({theirs_bytes / b / 1e9 / bandwidth:.0%})")
        print(line)


if __name__ == "__main__":
    main()
