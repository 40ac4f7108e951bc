// The kernels' entry points, defined in the other sources: bound to Python in bindings.cpp,
// called from C++ by decode_stack.cpp.

#pragma once

#include <torch/extension.h>

#include <tuple>

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
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t isa);
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor mins,
                          int64_t isa);
bool int4_amx_available();
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> int4_amx_pack(torch::Tensor q, torch::Tensor scale,
                                                                      torch::Tensor min);
torch::Tensor int4_amx_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                              torch::Tensor mins);
void bind_decode_stack(pybind11::module& m);
