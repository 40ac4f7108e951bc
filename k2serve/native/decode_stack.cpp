// A quantized Llama model's decoder layers for a step of decode rows only, in one call.
//
// A decode step of a small model is many short kernels: per layer two residual-add norms,
// four int4 linears, RoPE + KV write + attention and silu * up. Called one by one from
// Python, each costs ~10-40 us of interpreter, dispatch and wrapper time on top of its work,
// under the GIL, and the interpreter's share runs on one core. This object holds the layers'
// weights and runs the same kernels in the same order from C++ (the GIL released): every
// result is bitwise what the per-op path (LlamaDecoderLayer.forward_quantized) computes,
// whatever the batch, because it is the same functions on the same inputs.

#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "ops.h"

namespace {

// One int4 linear in our kernels' layout (Int4Linear.packed / scales / mins).
struct Int4Weight {
  torch::Tensor packed, scales, mins;
  bool amx;  // the AMX kernel (bfloat16 x), else the integer-dot one (x as it comes)

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (amx) return int4_amx_linear(x.to(torch::kBFloat16), packed, scales, mins);
    return int4_linear(x, packed, scales, mins, -1);
  }
};

struct Layer {
  torch::Tensor norm1, norm2;  // RMSNorm weights, float32
  double eps1, eps2;
  Int4Weight qkv, o, gate_up, down;
};

}  // namespace

class LlamaDecodeStack {
 public:
  LlamaDecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                   torch::Tensor final_norm, double final_eps)
      : heads_(num_heads), kv_heads_(num_kv_heads), head_dim_(head_dim), scale_(scale),
        final_norm_(final_norm.contiguous()), final_eps_(final_eps) {}

  // norms: (weight, eps) x 2; linears: (packed, scales, mins, amx) for qkv, o, gate_up, down.
  void add_layer(torch::Tensor norm1, double eps1, torch::Tensor norm2, double eps2,
                 std::vector<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, bool>> linears) {
    TORCH_CHECK(linears.size() == 4, "qkv, o, gate_up, down");
    auto weight = [&](int i) {
      auto& [packed, scales, mins, amx] = linears[i];
      return Int4Weight{packed, scales, mins, amx};
    };
    layers_.push_back(Layer{norm1.contiguous(), norm2.contiguous(), eps1, eps2, weight(0), weight(1),
                            weight(2), weight(3)});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: [B, hidden] float32 input embeddings of B decode rows; cos, sin_signed: [B, D]
  // float32; the pools, slots, tables and lengths as decode_rotary_attention takes them, one
  // pool per layer. -> the final norm's output [B, hidden] float32.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin_signed,
                        const std::vector<torch::Tensor>& k_pools, const std::vector<torch::Tensor>& v_pools,
                        torch::Tensor slots, torch::Tensor block_tables, torch::Tensor seq_lens,
                        int64_t block_size) const {
    TORCH_CHECK(k_pools.size() == layers_.size() && v_pools.size() == layers_.size(),
                "one K and one V pool per layer");
    const int64_t n = x.size(0), q_size = heads_ * head_dim_;
    c10::optional<torch::Tensor> residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      auto [normed, sum] = add_rms_norm(x, residual, layer.norm1, layer.eps1);
      auto attended = decode_rotary_attention(layer.qkv(normed), cos, sin_signed, k_pools[i], v_pools[i],
                                              slots, block_tables, seq_lens, block_size, scale_, heads_,
                                              kv_heads_);
      auto [normed2, sum2] = add_rms_norm(layer.o(attended.reshape({n, q_size})), sum, layer.norm2, layer.eps2);
      x = layer.down(silu_mul(layer.gate_up(normed2)));
      residual = sum2;
    }
    return std::get<0>(add_rms_norm(x, residual, final_norm_, final_eps_));
  }

 private:
  int64_t heads_, kv_heads_, head_dim_;
  double scale_;
  torch::Tensor final_norm_;
  double final_eps_;
  std::vector<Layer> layers_;
};

void bind_decode_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<LlamaDecodeStack>(m, "LlamaDecodeStack",
                               "a quantized Llama model's decoder layers for pure decode steps, one call")
      .def(py::init<int64_t, int64_t, int64_t, double, torch::Tensor, double>(), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("final_norm"),
           py::arg("final_eps"))
      .def("add_layer", &LlamaDecodeStack::add_layer)
      .def_property_readonly("num_layers", &LlamaDecodeStack::num_layers)
      .def("forward", &LlamaDecodeStack::forward, py::call_guard<py::gil_scoped_release>());
}
