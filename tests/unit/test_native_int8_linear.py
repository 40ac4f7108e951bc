"""The native int8 weight-only matmul (the quantized LM head's small-step kernel)."""

from __future__ import annotations

import pytest
import torch

from k2serve import native

kernels = native.kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C++ toolchain: fallbacks only")


@pytest.fixture(params=kernels.vector_isas() if kernels is not None else [], autouse=True)
def vector_path(request):
    """Every test on every vector path this CPU runs (K2SERVE_ISA picks one per process)."""
    before = kernels.vector_isa()
    kernels.set_vector_isa(request.param)
    yield request.param
    kernels.set_vector_isa(before)


def _case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g) * 3
    reference = (x.double() @ w.double().t()) * scale.double()
    return x, w, scale, reference


@pytest.mark.parametrize("m, n, k", [(1, 1000, 576), (3, 257, 64), (7, 96, 9216)])
def test_matches_float64_reference(m, n, k):
    """x is quantized to int16 per row: the error stays ~1e-4 of the largest output (torch's
    kernel, rounding x to bfloat16, errs ~4e-3). K = 9216 crosses an int32 -> float flush."""
    x, w, scale, reference = _case(m, n, k)
    y = kernels.int8_linear(x, w, scale)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert (y.double() - reference).abs().max() <= 2e-4 * reference.abs().max()


def test_a_row_does_not_depend_on_the_others():
    x, w, scale, _ = _case(9, 300, 576, seed=1)
    together = kernels.int8_linear(x, w, scale)
    for i in range(9):
        assert torch.equal(kernels.int8_linear(x[i:i + 1], w, scale)[0], together[i])


def test_zero_rows_and_empty_batches():
    _, w, scale, _ = _case(1, 40, 64)
    assert torch.equal(kernels.int8_linear(torch.zeros(2, 64), w, scale), torch.zeros(2, 40))
    assert kernels.int8_linear(torch.zeros(0, 64), w, scale).shape == (0, 40)


def test_bad_shapes_are_errors():
    _, w, scale, _ = _case(1, 40, 64)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.int8_linear(torch.zeros(1, 48), w[:, :48].contiguous(), scale)
    with pytest.raises(RuntimeError, match="int8"):
        kernels.int8_linear(torch.zeros(1, 64), w.float(), scale)


def test_avx2_and_portable_paths_agree_bitwise(vector_path):
    """The AVX2 path sums its 16 lanes in the portable loop's order: the same logits."""
    if vector_path == "avx512":
        pytest.skip("AVX-512 reduces its lanes in another order")
    x, w, scale, _ = _case(5, 70, 9216, seed=2)
    assert torch.equal(kernels.int8_linear(x, w, scale),
                       kernels.int8_linear(x, w, scale, isa="portable"))
