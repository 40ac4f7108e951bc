// The Python module: one entry per kernel, defined in the other sources.

#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     int64_t block_size, double scale);
torch::Tensor decode_rotary_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin_signed,
                                      torch::Tensor k_pool, torch::Tensor v_pool,
                                      torch::Tensor slots, torch::Tensor block_tables,
                                      torch::Tensor seq_lens, int64_t block_size, double scale,
                                      int64_t num_heads, int64_t num_kv_heads);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale);
bool int4_amx_available();
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> int4_amx_pack(torch::Tensor q, torch::Tensor scale,
                                                                      torch::Tensor min);
torch::Tensor int4_amx_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                              torch::Tensor mins);

// The widest vector path the kernels were compiled with (-march=native picks it).
static std::string vector_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "portable";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_isa", &vector_isa, "the vector instruction set the kernels were built for");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV pool (float32 or bfloat16)");
  m.def("decode_rotary_attention", &decode_rotary_attention,
        "RoPE + KV write + paged decode attention for a fused qkv projection's decode rows");
  m.def("add_rms_norm", &add_rms_norm, "(RMSNorm(x + residual) * weight, x + residual), float32",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [M, 2I] gate/up projection");
  m.def("int8_linear", &int8_linear, "x @ W^T, W int8 with a float32 scale per row, float32 x");
  m.def("int4_amx_available", &int4_amx_available,
        "whether int4_amx_linear runs here (built with AMX, and the OS grants it)");
  m.def("int4_amx_pack", &int4_amx_pack, "(q, scale, min) -> int4_amx_linear's weight layout",
        py::arg("q"), py::arg("scale"), py::arg("min"));
  m.def("int4_amx_linear", &int4_amx_linear, "bfloat16 x @ W^T, W 4-bit groups of 32, on AMX tiles");
}
