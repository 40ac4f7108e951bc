"""The native int4 linear on integer dots (k2serve/native/int4_linear.cpp), on every vector
path this CPU runs (portable loops, AVX2, AVX-512), against float64, on the embedded
SmolLM2's own 4-bit tensors and synthetic ones.

x is quantized per row and group of 32 to int16 (x ~ d c, |x - d c| <= 0.51 d, d = max|x_g|
/ 32767), the dots are exact and the sums float32, and y is rounded once to bfloat16:
|y - x @ W^T| <= 2^-8 |x @ W^T| + sum_g 0.51 d_g sum_k |w_gk| + 2^-16 (|x| @ |W|^T) (the last
term: float32 sums, generously).
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
pytestmark = pytest.mark.skipif(kernels is None, reason="no native kernels: torch's int4 kernel runs")
PATHS = kernels.vector_isas() if kernels is not None else []
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2():
    return GGUFCheckpoint(smollm2_gguf_path())


def assert_within_bound(y, x, w):
    """y (bfloat16) is x @ W^T (float64) within the documented bound."""
    x = x.double()
    ref = x @ w.t()
    m, k = x.shape
    d = x.abs().view(m, k // 32, 32).amax(-1) / 32767  # [M, G]
    group_w = w.abs().view(w.shape[0], k // 32, 32).sum(-1)  # [N, G]
    bound = 2.0 ** -8 * ref.abs() + 0.51 * d @ group_w.t() + 2.0 ** -16 * (x.abs() @ w.abs().t())
    excess = ((y.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess}"


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight", "model.layers.11.self_attn.q_proj.weight"])
def test_real_q4_1_tensors(smollm2, isa, name):
    qt = smollm2.load_tensor(name, keep_quantized=True)
    q, scale, minimum = qt.int4_affine()
    packed, scales, mins = kernels.int4_amx_pack(q, scale, minimum)
    x = torch.randn(37, q.shape[1], generator=torch.Generator().manual_seed(0)) * 3
    x[0, 5] = 400.0  # an outlier: only its own group's codes get coarser
    y = kernels.int4_linear(x, packed, scales, mins, isa=isa)
    assert y.dtype == torch.bfloat16 and y.shape == (37, q.shape[0])
    assert_within_bound(y, x, weight_of(q, scale, minimum))
    # bfloat16 activations are taken as they are
    xb = x.bfloat16()
    assert_within_bound(kernels.int4_linear(xb, packed, scales, mins, isa=isa), xb.float(), weight_of(q, scale, minimum))


@pytest.mark.parametrize("isa", PATHS)
def test_float32_scales_and_q4_0_q4_k_forms(isa):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (48, 96), generator=g, dtype=torch.uint8)
    scale, minimum = torch.rand(48, 3, generator=g) * 0.1, torch.randn(48, 3, generator=g) * 0.1
    packed, scales, mins = kernels.int4_amx_pack(q, scale, minimum)
    assert scales.dtype == torch.float32
    x = torch.randn(5, 96, generator=g)
    assert_within_bound(kernels.int4_linear(x, packed, scales, mins, isa=isa), x, weight_of(q, scale, minimum))
    x = torch.randn(4, 256, generator=g)
    for qt in (_synthetic(Q.Q4_0, rows=32, cols=256, seed=4), _q4_k(rows=32, cols=256, seed=4)):
        y = kernels.int4_linear(x, *kernels.int4_amx_pack(*qt.int4_affine()), isa=isa)
        assert_within_bound(y, x, qt.dequantize().double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_bitwise_the_same_at_any_m_and_on_every_path(dtype):
    """Rows are tiled 4 (AVX2) or 8 (AVX-512) at a time, up to 4 rows take a register-only
    path, and each path quantizes x with its own vector code: a row's result must not
    depend on any of that, nor on the vector path."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (64, 192), generator=g, dtype=torch.uint8)
    scale = (torch.rand(64, 6, generator=g) * 0.05).half().float()
    minimum = (torch.randn(64, 6, generator=g) * 0.05).half().float()
    packed, scales, mins = kernels.int4_amx_pack(q, scale, minimum)
    x = (torch.randn(70, 192, generator=g) * 3).to(dtype)
    x[7, :32] = 0  # an all-zero group
    everything = kernels.int4_linear(x, packed, scales, mins, isa="portable")
    for isa in PATHS:
        assert torch.equal(kernels.int4_linear(x, packed, scales, mins, isa=isa), everything), isa
        for start, end in [(0, 1), (5, 6), (3, 5), (3, 6), (2, 6), (3, 19), (0, 16), (16, 33), (31, 63), (2, 70)]:
            assert torch.equal(kernels.int4_linear(x[start:end], packed, scales, mins, isa=isa),
                               everything[start:end]), (isa, start, end)
        assert kernels.int4_linear(x[:0], packed, scales, mins, isa=isa).shape == (0, 64)


def test_zero_and_non_finite_rows():
    q = torch.randint(0, 16, (16, 64), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    packed, scales, mins = kernels.int4_amx_pack(q, torch.ones(16, 2), torch.ones(16, 2))
    x = torch.zeros(3, 64)
    x[1, 3] = float("nan")
    x[2, 40] = float("inf")
    for isa in PATHS:
        y = kernels.int4_linear(x, packed, scales, mins, isa=isa)
        assert torch.equal(y[0], torch.zeros(16, dtype=torch.bfloat16))
        assert not y[1:].float().isfinite().any()


def test_int4_linear_layer_runs_it(smollm2):
    """Where AMX is absent, an Int4Linear runs this kernel, with float32 activations."""
    path = native.int4_path()
    if path in (None, "amx"):
        pytest.skip(f"this CPU's int4 linear is {path or 'torch'}'s")
    qt = smollm2.load_tensor("model.layers.4.mlp.gate_proj.weight", keep_quantized=True)
    layer = Int4Linear(576, 1536, dense_min_rows=None)
    layer.load(qt)
    layer.finish_loading()
    assert f"int4 ({path})" in repr(layer) and layer.scale_zeros is None
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(3))
    y = layer.forward_raw(x)
    assert y.dtype == torch.bfloat16
    assert_within_bound(y, x, qt.dequantize().double())
    assert torch.equal(layer.forward_raw(x[1:2]), y[1:2])


def test_bad_inputs_are_errors():
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed, scales, mins = kernels.int4_amx_pack(q, torch.ones(32, 2), torch.ones(32, 2))
    with pytest.raises(RuntimeError, match="x: float32 or bfloat16"):
        kernels.int4_linear(torch.zeros(1, 64, dtype=torch.float16), packed, scales, mins)
    with pytest.raises(RuntimeError, match="x has 96 columns, the weight 64"):
        kernels.int4_linear(torch.zeros(1, 96), packed, scales, mins)
    with pytest.raises(RuntimeError, match="not built on this CPU"):
        kernels.int4_linear(torch.zeros(1, 64), packed, scales, mins, isa="sse9")


def test_k2serve_isa_forces_a_narrower_path_for_the_process():
    import os
    import subprocess
    import sys

    script = "from k2serve import native; native.kernels(); print(native.status()['vector_isa'], native.int4_path())"
    for wanted, int4 in [("portable", "None"), ("no-such-isa", None)]:
        env = dict(os.environ, K2SERVE_ISA=wanted)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        isa, path = out.stdout.split()
        if int4 is not None:
            assert (isa, path) == (wanted, int4)
        else:  # an unknown name: a warning, and the widest path
            assert isa == kernels.vector_isas()[-1] and "is not a vector path built here" in out.stderr
