"""Int4 weight-only linears (k2serve.models.layers.int4_linear) against float32 references.

The int4 path maps GGUF's 4-bit blocks exactly onto torch's int4pack format (checked with
zero tolerance on the dequantized weights); the matmul itself runs with bfloat16
activations, scales and output, so its results are compared with a bfloat16-sized bound:
|y - x @ W^T| <= 2^-7 * (|x| @ |W|^T) elementwise (measured worst on every Q4_1 tensor of
the embedded SmolLM2: 0.0031 * that sum, i.e. under 2^-8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from k2serve.models.layers.gguf_blocks import QuantizedTensor  # noqa: E402
from k2serve.models.layers.int4_linear import (  # noqa: E402
    DENSE_TILE_ROWS,
    LARGE_TILE_ROWS,
    Int4Linear,
    dequantize_int4,
    int4_mm,
    large_tiles_agree,
    pack_int4,
)
from k2serve.models.layers.lm_head import QuantizedLMHead, requantize_int8  # noqa: E402
from k2serve.models.layers.quantization import QuantizationConfig  # noqa: E402
from k2serve.models.loaders.gguf import GGUFCheckpoint  # noqa: E402
from k2serve.native import kernels as native_kernels  # noqa: E402
from tests.tiny_models import smollm2_gguf_path  # noqa: E402

Q = gguf.GGMLQuantizationType
BOUND = 2.0 ** -7  # of |x| @ |W|^T, see the module docstring


def assert_close_bf16(y, x, weight):
    ref = x @ weight.t()
    bound = BOUND * (x.abs() @ weight.abs().t()) + 1e-6
    excess = ((y - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bf16 bound by {excess}"
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2


@pytest.fixture(scope="module")
def smollm2():
    return GGUFCheckpoint(smollm2_gguf_path())


def _synthetic(qtype, rows=96, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 1, (rows, 1))).astype(np.float32)
    return QuantizedTensor(qtype, (rows, cols), gguf.quants.quantize(x, qtype))


def _q4_k(rows=64, cols=512, seed=0):
    """Random Q4_K super-blocks (random 6-bit scales/mins and nibbles, sane fp16 d/dmin)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    raw[:, 2:4] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return QuantizedTensor(Q.Q4_K, (rows, cols), raw.reshape(rows, -1))


def _linear(qt, dense_min_rows=None):
    layer = Int4Linear(qt.shape[1], qt.shape[0], dense_min_rows=dense_min_rows)
    layer.load(qt)
    layer.finish_loading()
    return layer


# ------------------------------------------------------------------ exact block mapping
@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight", "model.layers.7.self_attn.q_proj.weight",
                                  "model.layers.29.mlp.gate_proj.weight"])
def test_real_q4_1_maps_exactly_onto_int4_groups(smollm2, name):
    qt = smollm2.load_tensor(name, keep_quantized=True)
    assert isinstance(qt, QuantizedTensor) and qt.qtype == Q.Q4_1
    q, scale, zero = qt.int4_groups()
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert torch.equal(dequantize_int4(q, scale, zero), qt.dequantize())
    # and the loader's float path (q rows un-permuted the same way) agrees
    assert torch.equal(qt.dequantize(), smollm2.load_tensor(name))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_synthetic_block_types_map_exactly(qtype):
    qt = _synthetic(qtype)
    assert torch.equal(dequantize_int4(*qt.int4_groups()), qt.dequantize())


def test_q4_k_maps_exactly():
    qt = _q4_k()
    assert torch.equal(dequantize_int4(*qt.int4_groups()), qt.dequantize())


def test_unmappable_types_say_so():
    qt = _synthetic(Q.Q8_0)
    assert not qt.int4_mappable
    with pytest.raises(ValueError, match="Q8_0"):
        qt.int4_groups()


# ------------------------------------------------------------------ the int4 matmul
def test_pack_int4_matches_formula():
    torch.manual_seed(0)
    n, k = 80, 192
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, zero = torch.rand(n, k // 32) * 0.1 + 0.01, torch.randn(n, k // 32) * 0.1
    packed, scale_zeros = pack_int4(q, scale, zero)
    assert scale_zeros.shape == (k // 32, n, 2) and scale_zeros.dtype == torch.bfloat16
    x = torch.randn(5, k)
    # the reference with the kernel's own bf16-rounded scale/zero: only activation and
    # output rounding remain
    w = dequantize_int4(q, scale.bfloat16().float(), zero.bfloat16().float())
    assert_close_bf16(int4_mm(x, packed, scale_zeros).float(), x, w)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight",
                                  "model.layers.29.mlp.up_proj.weight"])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_real_int4_linear_vs_dequantized(smollm2, name, m):
    qt = smollm2.load_tensor(name, keep_quantized=True)
    layer = _linear(qt)
    assert layer.is_int4 and layer.weight is None  # 4-bit only without a dense copy
    torch.manual_seed(m)
    x = torch.randn(m, qt.shape[1])
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (m, qt.shape[0])
    assert_close_bf16(y, x, qt.dequantize())


@pytest.mark.parametrize("make", [lambda: _synthetic(Q.Q4_0), lambda: _synthetic(Q.Q4_1), _q4_k],
                         ids=["Q4_0", "Q4_1", "Q4_K"])
def test_synthetic_int4_linear_vs_dequantized(make):
    qt = make()
    x = torch.randn(4, qt.shape[1])
    assert_close_bf16(_linear(qt)(x), x, qt.dequantize())


def test_merged_shards_stack_rows(smollm2):
    names = {s: f"model.layers.2.self_attn.{s}_proj.weight" for s in ("q", "k", "v")}
    parts = {s: smollm2.load_tensor(n, keep_quantized=True) for s, n in names.items()}
    layer = Int4Linear(576, {s: p.shape[0] for s, p in parts.items()}, dense_min_rows=None)
    for shard in ("v", "q", "k"):  # any load order
        layer.load(parts[shard], shard)
    layer.finish_loading()
    x = torch.randn(2, 576)
    assert_close_bf16(layer(x), x, torch.cat([parts[s].dequantize() for s in ("q", "k", "v")]))


# ------------------------------------------------------------------ kernel choice by M
def test_kernel_choice_by_rows(smollm2):
    qt = smollm2.load_tensor("model.layers.5.mlp.gate_proj.weight", keep_quantized=True)
    layer = _linear(qt, dense_min_rows=4)
    weight = qt.dequantize()
    assert torch.equal(layer.weight, weight)  # the dense copy is gguf's exact dequantization
    torch.manual_seed(0)
    x = torch.randn(6, qt.shape[1])
    small = torch.cat([layer(x[i:i + 1]) for i in range(6)])  # M=1: int4
    large = layer(x)  # M=6 >= 4: dense float32, exact
    assert torch.equal(large, x @ weight.t())
    assert not torch.equal(small, large)  # really two kernels...
    assert_close_bf16(small, x, weight)  # ...that agree within the bf16 bound
    assert torch.equal(layer(x[:3]), torch.cat([layer(x[i:i + 1]) for i in range(3)]))  # M=3: int4 too


def test_unmappable_layers_fall_back_to_dense():
    qt = _synthetic(Q.Q8_0)
    layer = _linear(qt, dense_min_rows=32)
    assert not layer.is_int4
    x = torch.randn(2, qt.shape[1])
    assert torch.equal(layer(x), x @ qt.dequantize().t())
    merged = Int4Linear(256, {"a": 96, "b": 32})  # one float shard: the whole layer is dense
    merged.load(_synthetic(Q.Q4_1), "a")
    merged.load(torch.randn(32, 256), "b")
    merged.finish_loading()
    assert not merged.is_int4 and merged.weight.shape == (128, 256)


def test_load_errors():
    layer = Int4Linear(256, {"a": 96, "b": 32})
    with pytest.raises(ValueError, match="expected shape"):
        layer.load(_synthetic(Q.Q4_1, rows=32), "a")
    layer.load(_synthetic(Q.Q4_1), "a")
    with pytest.raises(ValueError, match="never loaded"):
        layer.finish_loading()


# ------------------------------------------------------------------ LM head
def test_int8_requantization_error():
    torch.manual_seed(0)
    w = torch.randn(300, 128) * torch.rand(300, 1)
    q, scale = requantize_int8(w)
    assert q.dtype == torch.int8
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.fixture(scope="module")
def embeddings(smollm2):
    qt = smollm2.load_tensor("model.embed_tokens.weight", keep_quantized=True)
    assert qt.qtype == Q.Q8_0 and qt.shape == (49152, 576)
    return qt, qt.dequantize()


def _head(embeddings, kernel, exact_top, native=True):
    qt, weight = embeddings
    head = QuantizedLMHead(576, 49152, QuantizationConfig(head=kernel, head_dense_min_rows=4,
                                                          head_exact_top=exact_top, native=native))
    head.load(qt)
    head.finish_loading(dense_weight=weight)
    assert head.weight is weight and head.small_kernel == kernel
    return head


# max |error| / (|x| @ |W|^T) of the approximate head, measured on this input: int8 0.0043
# (per-row requantization of Q8_0's per-block scales; the same with torch's kernel, which
# rounds x to bfloat16, and our native one, which quantizes x to int16), int4 0.035
# (group-32 min/max)
@pytest.mark.parametrize("kernel, rel_bound, native", [
    ("int8", 0.006, True), ("int8", 0.006, False), ("int4", 0.05, True), ("dense", 0.0, True)])
def test_lm_head_kernels(embeddings, kernel, rel_bound, native):
    _, weight = embeddings
    torch.manual_seed(0)
    x = torch.randn(4, 576) * 2
    ref = x @ weight.t()
    head = _head(embeddings, kernel, exact_top=0, native=native)
    if kernel == "int8":
        assert (head._int8_native is not None) == (native and native_kernels() is not None)
    assert torch.equal(head(x), ref)  # M >= 4: dense float32
    small = head(x[:2])
    assert small.dtype == torch.float32 and small.shape == (2, 49152)
    err = ((small - ref[:2]).abs() / (x[:2].abs() @ weight.abs().t())).max().item()
    assert err <= rel_bound, err


def test_dense_lm_head_rows_do_not_depend_on_the_batch(embeddings):
    """A row's float32 logits are bitwise the same whatever the step's row count: BLAS
    libraries sum 1-3 rows in another order than a GEMM's (MKL on AMD), so the head pads
    them (greedy and sampled output the same alone or batched, on every CPU)."""
    head = _head(embeddings, "dense", exact_top=0)
    torch.manual_seed(1)
    x = torch.randn(40, 576)
    full = head(x)
    for m in (1, 2, 3, 4, 8, 33):
        assert torch.equal(head(x[:m]), full[:m]), m


def test_bfloat16_lm_head_keeps_its_top_logits_exact(embeddings):
    """A bfloat16 dense head (M >= head_dense_min_rows) still gives each row's top 16 logits
    in float32 from the float32 weight, as the small-M kernels do: greedy picks and top
    logprobs do not depend on which path a step took."""
    qt, weight = embeddings
    head = QuantizedLMHead(576, 49152, QuantizationConfig(head_dense_min_rows=4,
                                                          dense_dtype=torch.bfloat16))
    head.load(qt)
    head.finish_loading(dense_weight=weight)
    assert head.weight is weight and head.gemm_weight.dtype == torch.bfloat16
    torch.manual_seed(2)
    x = torch.randn(6, 576) * 2
    ref = x @ weight.t()
    big, small = head(x), head(x[:3])
    assert big.dtype == small.dtype == torch.float32
    assert torch.equal(big.argmax(-1), ref.argmax(-1))
    top = ref.topk(5, dim=-1)
    torch.testing.assert_close(big.gather(1, top.indices), top.values, rtol=0, atol=1e-4)
    torch.testing.assert_close(small.gather(1, top.indices[:3]), big[:3].gather(1, top.indices[:3]),
                               rtol=0, atol=1e-4)
    # the rest of the vocabulary: bfloat16-sized errors
    err = ((big - ref).abs() / (x.abs() @ weight.abs().t())).max().item()
    assert 0 < err <= 2 ** -7, err


def test_lm_head_exact_top(embeddings):
    """int8 logits, then the top 16 recomputed in float32: the argmax and top logprobs are
    the dense head's (the int4 head errs ~10x more: its top 16 can miss the best token)."""
    _, weight = embeddings
    torch.manual_seed(1)
    x = torch.randn(3, 576) * 2
    ref = x @ weight.t()
    logits = _head(embeddings, "int8", exact_top=16)(x)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    top = ref.topk(5, dim=-1)
    torch.testing.assert_close(logits.gather(1, top.indices), top.values, rtol=0, atol=1e-4)


@pytest.mark.parametrize("vocab, block", [(49152, 128), (32000, 128), (1000, 0)])
def test_lm_head_two_stage_top_k(vocab, block):
    head = QuantizedLMHead(64, vocab, QuantizationConfig())
    assert head._block == block
    torch.manual_seed(0)
    logits = torch.randn(3, vocab)
    got = head._top_indices(logits)
    want = logits.topk(16, dim=-1).indices
    assert got.shape == (3, 16)
    assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()]


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16])
def test_dense_row_runs_take_the_dense_weight_and_the_rest_int4(dense_dtype):
    """Under a `dense_rows` plan a row's result depends only on its own kernel, not on M."""
    qt = _synthetic(Q.Q4_1, rows=96, cols=64, seed=5)
    layer = Int4Linear(64, 96, dense_min_rows=None, dense_copy=True, dense_dtype=dense_dtype)
    layer.load(qt)
    layer.finish_loading()
    assert layer.weight.dtype == dense_dtype
    torch.testing.assert_close(layer.weight.float(), qt.dequantize(), rtol=2 ** -8, atol=0)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    int4_alone = torch.cat([layer(x[i:i + 1]) for i in range(7)])
    dense_alone = torch.nn.functional.linear(x.to(dense_dtype), layer.weight).float()
    planned = layer(x, dense_rows=[(1, 3), (5, 6)])
    for i in range(7):
        expected = dense_alone[i] if i in (1, 2, 5) else int4_alone[i]
        torch.testing.assert_close(planned[i], expected.to(torch.bfloat16).float())
    torch.testing.assert_close(layer(x, dense_rows=[(0, 7)]), dense_alone.to(torch.bfloat16).float())


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16])
def test_a_dense_row_is_bitwise_the_same_whatever_the_run_length(dense_dtype, monkeypatch):
    """MKL's (oneDNN's) result for a row changes with M; the plan's fixed-size tiles keep it,
    large tiles included where the probe found them to agree (on this CPU)."""
    qt = _synthetic(Q.Q4_1, rows=256, cols=512, seed=6)
    layer = Int4Linear(512, 256, dense_min_rows=None, dense_copy=True, dense_dtype=dense_dtype)
    layer.load(qt)
    layer.finish_loading()
    large = large_tiles_agree(512, 256, dense_dtype, torch.get_num_threads())  # probed before recording
    gemm_rows = []
    linear = torch.nn.functional.linear

    def recording_linear(x, weight):
        gemm_rows.append(x.shape[0])
        return linear(x, weight)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    x = torch.randn(700, 512, generator=torch.Generator().manual_seed(1))
    everything = layer(x, dense_rows=[(0, 700)])
    assert gemm_rows == ([LARGE_TILE_ROWS, DENSE_TILE_ROWS, DENSE_TILE_ROWS] if large else [DENSE_TILE_ROWS] * 6)
    for start, end in [(10, 11), (10, 13), (0, 100), (250, 300), (5, 200), (100, 650), (300, 700)]:
        assert torch.equal(layer(x[start:end], dense_rows=[(0, end - start)]), everything[start:end])


def test_dense_dtype_is_float32_or_bfloat16():
    with pytest.raises(ValueError, match="dense_dtype must be float32 or bfloat16"):
        QuantizationConfig(dense_dtype=torch.float16)
