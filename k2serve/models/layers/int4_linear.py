"""Int4 weight-only linears: GGUF 4-bit weights kept 4-bit, run by an int4 kernel.

A layer's weight is ``w = scale * q + min`` per 32-column group (``gguf_blocks.py``). Three
kernels run that form, all with a bfloat16 result:

- ours, on Intel AMX tiles (``k2serve/native/int4_amx.cpp``), where the CPU has AMX and the
  native kernels are built: bfloat16 activations, exact products, float32 scales and sums
  (float16 where that is exact), and a row's result bitwise the same at any M; 1.15x
  torch's kernel's speed at one row, 2.2x at 8, 3.1x at 32 (``python benchmarks/int4_kernels.py``);
- ours on AVX2 / AVX-512 integer dots (``k2serve/native/int4_linear.cpp``) on other x86
  CPUs: float32 (or bfloat16) activations quantized per group of 32 to int16, exact integer
  dots, float32 scales and sums, a row's result bitwise the same at any M (and on either
  path); same weight layout as the AMX kernel's;
- torch's (``aten._weight_int4pack_mm_for_cpu``, group size 32), elsewhere: it dequantizes
  ``w = (q - 8) * scale + zero``, so ``zero = min + 8 scale``, with scale and zero rounded to
  bfloat16. It is fast only with bfloat16 activations (its float32 and float16 paths are
  reference loops, ~30-100x slower) and costs about the same per row at any M.

Which kernel runs depends on M, the number of rows (tokens) of the input: the int4 kernel
is bandwidth-friendly and wins for small M (decode), a dense GEMM wins for large M (prefill
chunks, big decode batches). ``Int4Linear`` keeps a dense copy of the (dequantized) weight
for M >= ``dense_min_rows`` unless told not to (``dense_min_rows=None``: int4 for every M,
4-bit memory only). The copy is float32, or bfloat16 where the CPU multiplies bfloat16
natively (AMX / AVX512-BF16: oneDNN's GEMM is 2.3-3.3x float32's there, and its activations
are rounded to bfloat16 as the int4 kernel's already are). A caller can instead pick the
kernel per row: ``dense_rows`` (a ``DenseRows`` plan, which the engine carries on the step's
attention context) names the row runs that take the dense copy.

A layer whose checkpoint tensors do not map onto int4 holds a dense float32 weight and uses
``F.linear`` for every M.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from k2serve import native
from k2serve.models.layers.gguf_blocks import GROUP_SIZE, QuantizedTensor

INT4_ACT_DTYPE = torch.bfloat16  # the only fast activation dtype of the CPU int4 kernel
# Rows (tokens) from which the dense float32 GEMM beats torch's int4 kernel.
DEFAULT_DENSE_MIN_ROWS = 32
# Rows per dense GEMM under a ``dense_rows`` plan: large enough for GEMM efficiency (float32
# GEMM ~1 ms/token here from 128 rows, vs the int4 kernel's ~2 ms at any M), small enough
# that a short run of prompt rows (a prefix-cache hit's suffix) pads little.
DENSE_TILE_ROWS = 128
# A run with at least LARGE_TILE_MIN_ROWS rows left takes a GEMM of LARGE_TILE_ROWS rows
# instead (SmolLM2's layer shapes, float32, Zen 3, 2 threads: 173 vs 126 GFLOP/s), but only
# where the BLAS computes each row of it bitwise as in a DENSE_TILE_ROWS GEMM of the same
# weight shape (``large_tiles_agree``, checked once per shape): a row's result then does not
# depend on which tile it falls in.
LARGE_TILE_ROWS = 512
LARGE_TILE_MIN_ROWS = 384

# Row runs [start, end) of an input that take the dense weight, every other row the int4
# kernel, whatever M is (empty or None: the kernel follows M).
DenseRows = list[tuple[int, int]]


@functools.cache
def large_tiles_agree(in_features: int, out_features: int, dtype: torch.dtype, threads: int) -> bool:
    """Whether ``F.linear`` gives each row of a LARGE_TILE_ROWS GEMM bitwise as in a
    DENSE_TILE_ROWS one, for this weight shape, dtype and thread count. MKL and oneDNN pick
    their kernel (and so their summation order) by shape and threads, not by values, so one
    random probe per shape tells. (~10 ms once per shape; ``threads``: part of the key.)"""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(LARGE_TILE_ROWS, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    large = F.linear(x, weight)
    return all(torch.equal(F.linear(x[i:i + DENSE_TILE_ROWS], weight), large[i:i + DENSE_TILE_ROWS])
               for i in range(0, LARGE_TILE_ROWS, DENSE_TILE_ROWS))


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              dtype: torch.dtype = INT4_ACT_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] in 0..15, scale/zero [N, K/32]) -> (packed weight, qScaleAndZeros [K/32, N, 2])
    for ``aten._weight_int4pack_mm_for_cpu``."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scale_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()
    return packed, scale_zeros


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ W^T with W in int4pack form -> [M, N] in the kernel dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(scale_zeros.dtype), packed, GROUP_SIZE, scale_zeros)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight the int4 kernel computes with (before its bf16 rounding of scale/zero)."""
    n, k = q.shape
    w = (q.float() - 8).view(n, k // GROUP_SIZE, GROUP_SIZE) * scale[..., None] + zero[..., None]
    return w.view(n, k)


def requantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float [N, K] weight -> group-32 min/max (q, scale, zero) for ``pack_int4`` (lossy)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((groups - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo + 8 * scale


def _quantized(part) -> bool:
    """A 4-bit source (GGUF's ``QuantizedTensor``, compressed-tensors' ``PackedInt4Tensor``:
    ``int4_mappable``, ``int4_affine()``, ``dequantize()``), not a float tensor."""
    return isinstance(part, QuantizedTensor) or hasattr(part, "int4_affine")


class Int4Linear(nn.Module):
    """y = x @ W^T with W kept in int4 (group 32) when its checkpoint tensors allow it.

    Same loading interface as ``Linear``/``MergedLinear``: ``load(tensor, shard)`` takes a
    float tensor or a ``QuantizedTensor`` per shard (``shard_sizes`` given: the rows of each
    stacked projection); ``finish_loading()`` packs once every shard is in. If any shard is
    not int4-mappable the whole layer becomes a dense float32 linear.
    """

    def __init__(self, in_features: int, out_features: int | dict[str, int],
                 dense_min_rows: int | None = DEFAULT_DENSE_MIN_ROWS, dense_copy: bool = False,
                 dense_dtype: torch.dtype = torch.float32, native: bool = True):
        super().__init__()
        self.dense_copy = dense_copy
        self.dense_dtype = dense_dtype
        self.native = native  # our native kernels where they run (AMX int4; the head's int8)
        if isinstance(out_features, dict):
            self.shard_sizes = dict(out_features)
        else:
            self.shard_sizes = {None: out_features}
        self.shard_offsets, offset = {}, 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size
        self.in_features, self.out_features = in_features, offset
        self.dense_min_rows = dense_min_rows
        self._pending: dict = {}
        self.packed: torch.Tensor | None = None  # the int4 weight, in its kernel's layout
        self.scale_zeros: torch.Tensor | None = None  # torch's kernel
        self.scales: torch.Tensor | None = None  # ours (with mins)
        self.mins: torch.Tensor | None = None
        self._native_linear = None  # our kernel's entry point, when it runs this layer
        self._native_path: str | None = None  # "amx", "avx512" or "avx2"
        self.weight: torch.Tensor | None = None  # dense (large M, or the only path)

    def extra_repr(self) -> str:
        kind = (f"int4 ({self._native_path})" if self._native_path else "int4") if self.packed is not None else "dense"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"dense_min_rows={self.dense_min_rows if self.packed is not None else 0}")

    @property
    def is_int4(self) -> bool:
        return self.packed is not None

    @property
    def int4_bytes(self) -> int:
        """Bytes of the int4 weight with its scales (what a one-row step reads)."""
        parts = (self.packed, self.scale_zeros, self.scales, self.mins)
        return sum(t.nbytes for t in parts if t is not None)

    def shard_shape(self, shard: str | None = None) -> tuple[int, int]:
        return (self.shard_sizes[shard], self.in_features)

    def load(self, tensor, shard: str | None = None) -> None:
        if shard not in self.shard_sizes:
            raise ValueError(f"unknown shard {shard!r}")
        expected = self.shard_shape(shard)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(tensor.shape)}")
        self._pending[shard] = tensor

    def finish_loading(self) -> None:
        missing = [s for s in self.shard_sizes if s not in self._pending]
        if missing:
            raise ValueError(f"shard(s) {missing} were never loaded")
        parts = [self._pending[s] for s in self.shard_sizes]
        self._pending = {}
        if all(_quantized(p) and p.int4_mappable for p in parts):
            groups = [p.int4_affine() for p in parts]
            q, scale, minimum = (torch.cat([g[i] for g in groups]) for i in range(3))
            kernels = native.kernels() if self.native else None
            path = native.int4_path() if kernels is not None else None
            if path is not None and self.out_features % 16 == 0:
                self.packed, self.scales, self.mins = kernels.int4_amx_pack(q, scale, minimum)
                self._native_path = path
                self._native_linear = kernels.int4_amx_linear if path == "amx" else kernels.int4_linear
            else:
                self.packed, self.scale_zeros = pack_int4(q, scale, minimum + 8 * scale)
            if self.dense_min_rows is not None or self.dense_copy:
                # gguf's dequantization (w = d*q + m etc.), as the float32 model has; rounded
                # to bfloat16 for a bfloat16 GEMM
                self.weight = torch.cat([p.dequantize() for p in parts]).to(self.dense_dtype)
        else:
            self.dense_min_rows = 0
            self.weight = torch.cat([p.dequantize() if _quantized(p) else p.float() for p in parts])

    def forward(self, x: torch.Tensor, dense_rows: DenseRows | None = None) -> torch.Tensor:
        """x [M, in] -> float32 [M, out]. dense_rows: the rows that take the dense copy, every
        other row the int4 kernel, whatever M is (ignored by a layer without both)."""
        return self.forward_raw(x, dense_rows).float()

    def forward_raw(self, x: torch.Tensor, dense_rows: DenseRows | None = None) -> torch.Tensor:
        """``forward`` in the kernel's own dtypes: x float32 or bfloat16; the result is
        bfloat16 when the int4 kernel ran (M < dense_min_rows) or a ``dense_rows`` plan
        applied, else the dense weight's dtype."""
        if dense_rows and self.packed is not None and self.weight is not None:
            return self._forward_planned(x, dense_rows)
        if x.shape[0] >= self._dense_from:
            return F.linear(x.to(self.weight.dtype), self.weight)
        return self._int4(x)

    def _int4(self, x: torch.Tensor) -> torch.Tensor:
        if self._native_path == "amx":
            return self._native_linear(x.to(INT4_ACT_DTYPE), self.packed, self.scales, self.mins)
        if self._native_linear is not None:  # float32 or bfloat16 x as it comes
            return self._native_linear(x, self.packed, self.scales, self.mins)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(INT4_ACT_DTYPE), self.packed, GROUP_SIZE, self.scale_zeros)

    def _forward_planned(self, x: torch.Tensor, runs: DenseRows) -> torch.Tensor:
        """bfloat16 [M, out]: the plan's dense runs through the dense weight, the rest int4.

        Dense rows go through GEMMs of exactly DENSE_TILE_ROWS rows (the last tile padded),
        or LARGE_TILE_ROWS while that many are left (``large_tiles_agree``): MKL and oneDNN
        pick their algorithm by M, and a row's result is bitwise the same only among GEMMs
        that sum alike (wherever the row sits in the tile). Results are rounded to bfloat16
        like the int4 kernel's, so the ops that follow see one dtype whatever mix of kernels
        the step used."""
        m = x.shape[0]
        out = torch.empty(m, self.out_features, dtype=INT4_ACT_DTYPE)
        large = large_tiles_agree(self.in_features, self.out_features, self.weight.dtype,
                                  torch.get_num_threads())
        row = 0
        for start, end in [*runs, (m, m)]:
            if start > row:
                out[row:start] = self._int4(x[row:start])
            tile = start
            while tile < end:
                size = LARGE_TILE_ROWS if large and end - tile >= LARGE_TILE_MIN_ROWS else DENSE_TILE_ROWS
                rows = min(size, end - tile)
                if rows < size:  # one copy (with the dtype change) and a zeroed tail
                    block = x.new_empty(size, x.shape[1], dtype=self.weight.dtype)
                    block[:rows].copy_(x[tile:tile + rows])
                    block[rows:].zero_()
                else:
                    block = x[tile:tile + rows].to(self.weight.dtype)
                out[tile:tile + rows] = F.linear(block, self.weight)[:rows]
                tile += rows
            row = end
        return out

    def uses_int4(self, rows: int) -> bool:
        """Whether an input of ``rows`` rows runs the int4 kernel."""
        return rows < self._dense_from

    @property
    def _dense_from(self) -> int | float:
        if self.packed is None:
            return 0
        return float("inf") if self.dense_min_rows is None else self.dense_min_rows
