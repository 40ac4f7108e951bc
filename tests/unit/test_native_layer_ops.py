"""The native fused layer ops (residual add + RMSNorm, silu * mul) against PyTorch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k2serve import native

kernels = native.kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C++ toolchain: fallbacks only")


def _reference_norm(x, weight, eps):
    return F.rms_norm(x.double(), (x.shape[-1],), weight.double(), eps).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_pytorch(dtype, with_residual):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 576, generator=g) * 3).to(dtype)
    residual = torch.randn(7, 576, generator=g) if with_residual else None
    weight = torch.rand(576, generator=g) + 0.5
    normed, total = kernels.add_rms_norm(x, residual, weight, 1e-5)
    expected_total = x.float() + residual if with_residual else x.float()
    assert total.dtype == normed.dtype == torch.float32
    assert torch.equal(total, expected_total)  # the add is exactly PyTorch's promotion
    torch.testing.assert_close(normed, _reference_norm(expected_total, weight, 1e-5),
                               atol=1e-5, rtol=1e-5)


def test_add_rms_norm_of_zeros_is_zeros_not_nan():
    normed, _ = kernels.add_rms_norm(torch.zeros(2, 64), None, torch.ones(64), 1e-6)
    assert torch.equal(normed, torch.zeros(2, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_pytorch(dtype):
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(5, 2 * 1536, generator=g) * 4).to(dtype)
    gate_up[0, :8] = torch.tensor([-100.0, -88.0, -30.0, 0.0, 30.0, 88.0, 100.0, 1e-3]).to(dtype)
    out = kernels.silu_mul(gate_up)
    gate, up = gate_up.float().chunk(2, -1)
    expected = F.silu(gate.double()) * up.double()
    assert out.dtype == dtype and out.shape == (5, 1536)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(3)
    x, residual = torch.randn(40, 576, generator=g), torch.randn(40, 576, generator=g)
    weight = torch.rand(576, generator=g)
    gate_up = torch.randn(40, 3072, generator=g).bfloat16()
    normed, _ = kernels.add_rms_norm(x, residual, weight, 1e-5)
    fused = kernels.silu_mul(gate_up)
    for i in (0, 17, 39):
        alone, _ = kernels.add_rms_norm(x[i:i + 1], residual[i:i + 1], weight, 1e-5)
        assert torch.equal(alone[0], normed[i])
        assert torch.equal(kernels.silu_mul(gate_up[i:i + 1])[0], fused[i])


def test_bad_shapes_are_errors():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.add_rms_norm(torch.zeros(2, 64), None, torch.ones(32), 1e-6)
    with pytest.raises(RuntimeError, match="residual"):
        kernels.add_rms_norm(torch.zeros(2, 64), torch.zeros(3, 64), torch.ones(64), 1e-6)
    with pytest.raises(RuntimeError, match=r"\[M, 2I\]"):
        kernels.silu_mul(torch.zeros(2, 63))
