// The Python module: one entry per kernel, defined in the other sources.

#include <torch/extension.h>

#include <atomic>

#include "isa.h"
#include "ops.h"

namespace k2serve_native {
namespace {
std::atomic<int> g_isa{compiled_isa()};
}
int active_isa() { return g_isa.load(std::memory_order_relaxed); }
}  // namespace k2serve_native

namespace {
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

int isa_index(const std::string& name) {
  for (int i = 0; i <= k2serve_native::compiled_isa(); ++i)
    if (name == kIsaNames[i]) return i;
  std::string built;
  for (int i = 0; i <= k2serve_native::compiled_isa(); ++i) built += std::string(i ? ", " : "") + kIsaNames[i];
  TORCH_CHECK(false, "vector path '", name, "' is not built on this CPU (built: ", built, ")");
  return 0;
}

// The vector path the kernels take: the widest this CPU has, unless set lower.
std::string vector_isa() { return kIsaNames[k2serve_native::active_isa()]; }

// Every path built here, narrowest first (what a test may run).
std::vector<std::string> vector_isas() {
  return std::vector<std::string>(kIsaNames, kIsaNames + k2serve_native::compiled_isa() + 1);
}

// Chosen once at load (K2SERVE_ISA), before any model is built; tests switch it to run each path.
void set_vector_isa(const std::string& name) { k2serve_native::g_isa.store(isa_index(name)); }

int64_t isa_arg(const c10::optional<std::string>& name) { return name.has_value() ? isa_index(*name) : -1; }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_isa", &vector_isa, "the vector path the kernels take (portable, avx2, avx512)");
  m.def("vector_isas", &vector_isas, "every vector path built on this CPU, narrowest first");
  m.def("set_vector_isa", &set_vector_isa, "take this vector path from now on (one of vector_isas())");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV pool (float32 or bfloat16)");
  m.def("decode_rotary_attention", &decode_rotary_attention,
        "RoPE + KV write + paged decode attention for a fused qkv projection's decode rows");
  m.def("add_rms_norm", &add_rms_norm, "(RMSNorm(x + residual) * weight, x + residual), float32",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [M, 2I] gate/up projection");
  m.def("int8_linear", [](torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<std::string> isa) {
          return int8_linear(x, w, scale, isa_arg(isa));
        }, "x @ W^T, W int8 with a float32 scale per row, float32 x (isa: a path other than the process's)",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("isa") = py::none());
  m.def("int4_linear", [](torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor mins,
                          c10::optional<std::string> isa) {
          return int4_linear(x, packed, scales, mins, isa_arg(isa));
        }, "float32/bfloat16 x @ W^T, W from int4_amx_pack, on integer dots (AVX2/AVX-512/portable) -> bfloat16",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("mins"), py::arg("isa") = py::none());
  m.def("int4_amx_available", &int4_amx_available,
        "whether int4_amx_linear runs here (built with AMX, and the OS grants it)");
  m.def("int4_amx_pack", &int4_amx_pack, "(q, scale, min) -> int4_amx_linear's weight layout",
        py::arg("q"), py::arg("scale"), py::arg("min"));
  m.def("int4_amx_linear", &int4_amx_linear, "bfloat16 x @ W^T, W 4-bit groups of 32, on AMX tiles");
  bind_decode_stack(m);
}
