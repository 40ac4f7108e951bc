// Which vector path the kernels take, chosen once at load (k2serve.native sets it from the
// CPU and K2SERVE_ISA): one path per process whatever the batch, so a row's arithmetic never
// depends on M. The sources are built with -march=native, so every path up to the CPU's
// widest is compiled in; a lower one can be forced (tests run each one this CPU can).

#pragma once

namespace k2serve_native {

enum Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest path compiled in.
constexpr int compiled_isa() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__) && defined(__F16C__)
  return kAvx512;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return kAvx2;
#else
  return kPortable;
#endif
}

// The path in use (defined in bindings.cpp); starts at compiled_isa().
int active_isa();

}  // namespace k2serve_native
