"""The native AMX int4 kernel (k2serve/native/int4_amx.cpp) against float64, on the embedded
SmolLM2's own 4-bit tensors and synthetic ones.

Its products are exact (bfloat16 x times integers 16..31) and its sums float32, so its error
is the final rounding of y to bfloat16 plus float32 sums: |y - x @ W^T| <= 2^-9 |x @ W^T| +
2^-11 (|x| @ |W|^T) (the second term measured at most 2.9e-4 on SmolLM2's down_proj), with x
the bfloat16 input the kernel sees. torch's kernel rounds its scales to bfloat16, up to 2^-9
of |x| @ |W|^T.
"""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from k2serve import native  # noqa: E402
from k2serve.models.layers.int4_linear import Int4Linear  # noqa: E402
from k2serve.models.loaders.gguf import GGUFCheckpoint  # noqa: E402
from tests.tiny_models import smollm2_gguf_path  # noqa: E402
from tests.unit.int4_weights import weight_of  # noqa: E402
from tests.unit.test_quantized_linear import _q4_k, _synthetic  # noqa: E402

kernels = native.kernels()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.int4_amx_available(),
                                reason="no native kernels, or no AMX on this CPU: torch's int4 kernel runs")
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2():
    return GGUFCheckpoint(smollm2_gguf_path())


def assert_bf16_exact(y, x, w):
    """y (bfloat16) is x @ W^T (float64) rounded once to bfloat16, up to float32 sums."""
    ref = x.double() @ w.t()
    noise = 2.0 ** -11 * (x.double().abs() @ w.abs().t())
    excess = ((y.double() - ref).abs() - (2.0 ** -9 * ref.abs() + noise)).max().item()
    assert excess <= 0, f"error exceeds one bfloat16 rounding by {excess}"


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight", "model.layers.11.self_attn.q_proj.weight",
                                  "model.layers.29.mlp.up_proj.weight"])
def test_real_q4_1_tensors(smollm2, name):
    qt = smollm2.load_tensor(name, keep_quantized=True)
    q, scale, minimum = qt.int4_affine()
    packed, scales, mins = kernels.int4_amx_pack(q, scale, minimum)
    assert scales.dtype == mins.dtype == torch.float16  # Q4_1 stores float16: kept exactly
    assert packed.shape == (q.shape[0] // 16, q.shape[1] // 32, 256) and packed.dtype == torch.uint8
    x = (torch.randn(37, q.shape[1], generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    y = kernels.int4_amx_linear(x, packed, scales, mins)
    assert y.dtype == torch.bfloat16 and y.shape == (37, q.shape[0])
    w = weight_of(q, scale, minimum)
    assert torch.equal(w.float(), qt.dequantize())  # (q, scale, min) is the tensor, exactly
    assert_bf16_exact(y, x, w)


def test_scales_stay_float32_when_float16_would_round_them():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (48, 96), generator=g, dtype=torch.uint8)
    scale, minimum = torch.rand(48, 3, generator=g) * 0.1, torch.randn(48, 3, generator=g) * 0.1
    packed, scales, mins = kernels.int4_amx_pack(q, scale, minimum)
    assert scales.dtype == mins.dtype == torch.float32
    x = torch.randn(5, 96, generator=g).bfloat16()
    assert_bf16_exact(kernels.int4_amx_linear(x, packed, scales, mins), x, weight_of(q, scale, minimum))


def test_a_row_is_bitwise_the_same_at_any_m():
    """Rows go through 16-row tiles, two at a time: a row's result must not depend on the
    tile, the tile's row count or the other rows."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (64, 192), generator=g, dtype=torch.uint8)
    scale = (torch.rand(64, 6, generator=g) * 0.05).half().float()
    minimum = (torch.randn(64, 6, generator=g) * 0.05).half().float()
    packed, scales, mins = kernels.int4_amx_pack(q, scale, minimum)
    x = torch.randn(70, 192, generator=g).bfloat16()
    everything = kernels.int4_amx_linear(x, packed, scales, mins)
    for start, end in [(0, 1), (5, 6), (3, 19), (0, 16), (16, 33), (31, 63), (2, 70)]:
        assert torch.equal(kernels.int4_amx_linear(x[start:end], packed, scales, mins), everything[start:end])
    assert kernels.int4_amx_linear(x[:0], packed, scales, mins).shape == (0, 64)


def test_int4_linear_runs_it_unless_told_not_to(smollm2):
    qt = smollm2.load_tensor("model.layers.4.mlp.gate_proj.weight", keep_quantized=True)
    layers = {}
    for use_native in (True, False):
        layer = Int4Linear(576, 1536, dense_min_rows=None, native=use_native)
        layer.load(qt)
        layer.finish_loading()
        layers[use_native] = layer
    assert "amx" in repr(layers[True]) and layers[True].scale_zeros is None
    assert "amx" not in repr(layers[False]) and layers[False].scales is None
    assert layers[True].int4_bytes == layers[False].int4_bytes  # 4 bits + two 16-bit values per 32
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(3))
    w = qt.dequantize().double()
    assert_bf16_exact(layers[True].forward_raw(x), x.bfloat16(), w)
    # torch's kernel rounds its scales to bfloat16: within 2^-7 of |x| @ |W|^T (see
    # test_quantized_linear.py), where ours is within a bfloat16 rounding of x @ W^T
    ref, mag = x.double() @ w.t(), x.double().abs() @ w.abs().t()
    assert ((layers[False](x).double() - ref).abs() <= 2.0 ** -7 * mag).all()


def test_bad_inputs_are_errors():
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    scale = torch.ones(32, 2)
    packed, scales, mins = kernels.int4_amx_pack(q, scale, scale)
    with pytest.raises(RuntimeError, match="x: bfloat16"):
        kernels.int4_amx_linear(torch.zeros(1, 64), packed, scales, mins)
    with pytest.raises(RuntimeError, match="x has 96 columns, the weight 64"):
        kernels.int4_amx_linear(torch.zeros(1, 96, dtype=torch.bfloat16), packed, scales, mins)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.int4_amx_pack(q[:24], scale[:24], scale[:24])
    with pytest.raises(RuntimeError, match="codes 0..15"):
        kernels.int4_amx_pack(q + 16, scale, scale)
    with pytest.raises(RuntimeError, match=r"scale/min: \[N, K / 32\]"):
        kernels.int4_amx_pack(q, scale[:, :1], scale[:, :1])


def test_q4_0_and_q4_k_forms():
    """Q4_0 (min = -8 d) and Q4_K (products of a 6-bit scale and fp16 d: float32) round-trip."""
    q40, q4k = _synthetic(Q.Q4_0, rows=32, cols=256, seed=4), _q4_k(rows=32, cols=256, seed=4)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5)).bfloat16()
    for qt in (q40, q4k):
        q, scale, minimum = qt.int4_affine()
        assert torch.equal(weight_of(q, scale, minimum).float(), qt.dequantize())
        y = kernels.int4_amx_linear(x, *kernels.int4_amx_pack(q, scale, minimum))
        assert_bf16_exact(y, x, qt.dequantize().double())
