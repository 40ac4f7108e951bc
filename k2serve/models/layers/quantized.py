"""Weight-only quantized linear layers that keep GGUF 4-bit weights 4-bit.

GGUF's 4-bit block formats dequantize per block of 32 weights as an affine map of a 4-bit
code q in [0, 15]:

- Q4_1: ``w = d * q + m``                      (fp16 d, m per block)
- Q4_0: ``w = d * (q - 8)``                    (fp16 d per block)
- Q4_K: ``w = (d * sc) * q - dmin * mn``       (per 32-weight sub-block of a 256 super-block)

i.e. ``w = scale * q + min`` per group (``QuantizedTensor.int4_affine``). Two kernels run
that form, both with bfloat16 activations and a bfloat16 result:

- ours, on Intel AMX tiles (``k2serve/native/int4_amx.cpp``), where the CPU has AMX and the
  native kernels are built: exact products, float32 scales and sums (float16 where that is
  exact), and a row's result bitwise the same at any M; 1.15x torch's kernel's speed at
  one row, 2.2x at 8, 3.1x at 32 (``python benchmarks/int4_kernels.py``);
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
are rounded to bfloat16 as the int4 kernel's already are).

Tensors of other types (Q5_x, Q6_K, Q8_0, F16, F32, ...) are dequantized to a dense float32
weight and use ``F.linear`` for every M.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from k2serve import native

Q = gguf.GGMLQuantizationType
GROUP_SIZE = 32  # every mapped GGUF format has 32-weight (sub-)blocks
INT4_ACT_DTYPE = torch.bfloat16  # the only fast activation dtype of the CPU int4 kernel
# Rows (tokens) from which the dense float32 GEMM beats torch's int4 kernel.
DEFAULT_DENSE_MIN_ROWS = 32
# Rows per dense GEMM under a `dense_rows` plan: large enough for GEMM efficiency (float32
# GEMM ~1 ms/token here from 128 rows, vs the int4 kernel's ~2 ms at any M), small enough
# that a short run of prompt rows (a prefix-cache hit's suffix) pads little.
DENSE_TILE_ROWS = 128
# Rows from which the Q8_0 LM head uses the dense float32 GEMM rather than the int8 kernel.
DEFAULT_HEAD_DENSE_MIN_ROWS = 8
# MKL runs 1 row as a GEMV and 2-3 rows through another small-M kernel, each summing in its
# own order: on AMD (AVX2 and Zen 4) a row of the LM head's float32 GEMM then differs with
# M. From 4 rows on it runs one algorithm for the head's shape (measured: M = 4..300 bitwise
# equal on an AVX2 EPYC; Intel's agreed from 1). Not so for every shape: a 96 x 256 weight
# gives other sums at M = 5 than at M = 8.
MIN_GEMM_ROWS = 4


@dataclass(frozen=True)
class QuantizationConfig:
    """How a quantized model runs its linears.

    dense_min_rows: M from which ``Int4Linear`` uses its dense float32 copy (None: int4 for
      every M and no dense copy).
    head: the LM head's kernel for M < head_dense_min_rows: "int8" (per-row int8 requantized
      from the checkpoint weight; our native kernel with float32 x where the native kernels
      are built, else ``aten._weight_int8pack_mm``), "int4" (the int4 kernel;
      exact for a 4-bit head, a group-32 min/max requantization otherwise) or "dense".
    head_dense_min_rows: M from which the LM head uses the dense float32 weight.
    head_exact_top: after an int8/int4 head, recompute the logits of each row's top this-many
      tokens exactly (float32 rows of the dense weight): greedy picks and top logprobs then
      equal the dense head's whenever the true best token is among them (0: off).
    dense_copy: keep the dense float32 copy for ``dense_rows`` plans even when no M switches
      to it on its own (``dense_min_rows=None``).
    native: run the int8 LM head with our native kernel where the kernels are built (x
      quantized per row to int16: finer than torch's kernel's bfloat16), and the int4
      linears with our AMX kernel where the CPU has AMX; False: torch's kernels.
    dense_dtype: the dtype of the dense copies and their GEMMs (the LM head's too), float32
      or bfloat16 (see ``fast_bfloat16_gemm``). Layers with no int4 form stay float32.
    """

    dense_min_rows: int | None = DEFAULT_DENSE_MIN_ROWS
    dense_copy: bool = False  # keep the dense copy even with dense_min_rows=None (row plans)
    head: str = "int8"
    head_dense_min_rows: int = DEFAULT_HEAD_DENSE_MIN_ROWS
    head_exact_top: int = 16
    native: bool = True
    dense_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.head not in ("int8", "int4", "dense"):
            raise ValueError(f"unknown LM head kernel {self.head!r} (int8, int4 or dense)")
        if self.dense_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dense_dtype must be float32 or bfloat16, not {self.dense_dtype}")


def fast_bfloat16_gemm() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16), where
    oneDNN's bfloat16 GEMM beats float32's; elsewhere bfloat16 is emulated and slower."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


@dataclass
class QuantizedTensor:
    """A 2-D GGUF tensor kept as raw quantized blocks: ``data`` is uint8 [rows, row_bytes].

    ``shape`` is the row-major (HF) shape (rows = output features). Rows can be permuted
    freely (blocks never straddle rows), which is how q/k un-permutation is applied.
    """

    qtype: Q
    shape: tuple[int, int]
    data: np.ndarray
    name: str = ""

    def __post_init__(self):
        if self.data.ndim != 2 or self.data.shape[0] != self.shape[0]:
            raise ValueError(f"GGUF tensor {self.name!r}: raw data {self.data.shape} does not fit {self.shape}")

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], exactly as ``gguf.quants.dequantize``."""
        try:
            array = gguf.quants.dequantize(self.data, self.qtype)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {self.name!r}: unsupported type {self.qtype.name}") from None
        array = np.asarray(array, dtype=np.float32).reshape(self.shape)
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    def permute_rows(self, fn) -> QuantizedTensor:
        return QuantizedTensor(self.qtype, self.shape, np.ascontiguousarray(fn(self.data)), self.name)

    @property
    def int4_mappable(self) -> bool:
        return self.qtype in _INT4_DECODERS and self.shape[1] % GROUP_SIZE == 0

    def int4_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q uint8 [rows, cols] in 0..15, scale, min float32 [rows, cols // 32]) such that
        ``w = scale * q + min`` per 32-column group: the format's own values (fp16 d and m
        for Q4_1, d and -8 d for Q4_0)."""
        if not self.int4_mappable:
            raise ValueError(f"GGUF tensor {self.name!r}: {self.qtype.name} does not map onto int4")
        rows, cols = self.shape
        q, scale, minimum = _INT4_DECODERS[self.qtype](self.data, rows, cols)
        return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(minimum)

    def int4_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q uint8 [rows, cols] in 0..15, scale, zero float32 [rows, cols // 32]) such that
        ``w = (q - 8) * scale + zero`` per 32-column group (torch's int4 kernel's form)."""
        q, scale, minimum = self.int4_affine()
        return q, scale, minimum + 8 * scale


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are weights 0..15, high 16..31 (ggml)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# each -> (q, scale, min) with w = scale * q + min
def _decode_q4_1(data, rows, cols):
    blocks = data.reshape(rows, cols // 32, 20)
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    q = _nibbles(blocks[..., 4:]).reshape(rows, cols)
    return q, d, m


def _decode_q4_0(data, rows, cols):
    blocks = data.reshape(rows, cols // 32, 18)
    d = _f16(blocks[..., 0:2])
    q = _nibbles(blocks[..., 2:]).reshape(rows, cols)
    return q, d, -8 * d


def _decode_q4_k(data, rows, cols):
    # super-block of 256: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) x 8, 128 bytes
    # of nibbles; each 64-weight chunk holds 32 low nibbles (sub-block 2j), then 32 high (2j+1)
    n = rows * cols // 256
    blocks = data.reshape(n, 144)
    d, dmin = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
    sc, mn = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    scale = d * sc.astype(np.float32)
    minimum = -(dmin * mn.astype(np.float32))
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(rows, cols)
    return q, scale.reshape(rows, cols // 32), minimum.reshape(rows, cols // 32)


_INT4_DECODERS = {Q.Q4_1: _decode_q4_1, Q.Q4_0: _decode_q4_0, Q.Q4_K: _decode_q4_k}


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


_row_plan = threading.local()


@contextmanager
def dense_rows(runs: list[tuple[int, int]] | None):
    """Within the block, ``Int4Linear`` layers run rows [start, end) of each run with the
    dense float32 weight and every other row with the int4 kernel, whatever M is. The engine
    uses it to give a token's rows the same kernel whatever else is in the step (prompt
    tokens of long prompts dense — compute-bound, twice as fast — generated tokens int4).
    Layers without a dense copy ignore it."""
    previous = getattr(_row_plan, "runs", None)
    _row_plan.runs = runs or None
    try:
        yield
    finally:
        _row_plan.runs = previous


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
        self._amx_linear = None  # our kernel's entry point, when it runs this layer
        self.weight: torch.Tensor | None = None  # dense (large M, or the only path)

    def extra_repr(self) -> str:
        kind = ("int4 (amx)" if self._amx_linear is not None else "int4") if self.packed is not None else "dense"
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
        if all(isinstance(p, QuantizedTensor) and p.int4_mappable for p in parts):
            groups = [p.int4_affine() for p in parts]
            q, scale, minimum = (torch.cat([g[i] for g in groups]) for i in range(3))
            kernels = native.kernels() if self.native else None
            if kernels is not None and self.out_features % 16 == 0 and kernels.int4_amx_available():
                self.packed, self.scales, self.mins = kernels.int4_amx_pack(q, scale, minimum)
                self._amx_linear = kernels.int4_amx_linear
            else:
                self.packed, self.scale_zeros = pack_int4(q, scale, minimum + 8 * scale)
            if self.dense_min_rows is not None or self.dense_copy:
                # gguf's dequantization (w = d*q + m etc.), as the float32 model has; rounded
                # to bfloat16 for a bfloat16 GEMM
                self.weight = torch.cat([p.dequantize() for p in parts]).to(self.dense_dtype)
        else:
            self.dense_min_rows = 0
            self.weight = torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p.float()
                                     for p in parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> float32 [M, out]."""
        return self.forward_raw(x).float()

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` in the kernel's own dtypes: x float32 or bfloat16; the result is
        bfloat16 when the int4 kernel ran (M < dense_min_rows) or a ``dense_rows`` plan is
        active, else the dense weight's dtype."""
        runs = getattr(_row_plan, "runs", None)
        if runs is not None and self.packed is not None and self.weight is not None:
            return self._forward_planned(x, runs)
        if x.shape[0] >= self._dense_from:
            return F.linear(x.to(self.weight.dtype), self.weight)
        return self._int4(x)

    def _int4(self, x: torch.Tensor) -> torch.Tensor:
        if self._amx_linear is not None:
            return self._amx_linear(x.to(INT4_ACT_DTYPE), self.packed, self.scales, self.mins)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(INT4_ACT_DTYPE), self.packed, GROUP_SIZE, self.scale_zeros)

    def _forward_planned(self, x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """bfloat16 [M, out]: the plan's dense runs through the dense weight, the rest int4.

        Dense rows go through GEMMs of exactly DENSE_TILE_ROWS rows (the last tile padded):
        MKL and oneDNN pick their algorithm by M, and a row's result is bitwise the same
        only among GEMMs of one shape (wherever the row sits in the tile). Results are rounded to bfloat16 like the int4 kernel's, so
        the ops that follow see one dtype whatever mix of kernels the step used."""
        m = x.shape[0]
        out = torch.empty(m, self.out_features, dtype=INT4_ACT_DTYPE)
        row = 0
        for start, end in [*runs, (m, m)]:
            if start > row:
                out[row:start] = self._int4(x[row:start])
            for tile in range(start, end, DENSE_TILE_ROWS):
                rows = min(DENSE_TILE_ROWS, end - tile)
                block = x[tile:tile + rows].to(self.weight.dtype)
                if rows < DENSE_TILE_ROWS:
                    block = F.pad(block, (0, 0, 0, DENSE_TILE_ROWS - rows))
                out[tile:tile + rows] = F.linear(block, self.weight)[:rows]
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


def row_invariant_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for the LM head's dense path, whose result for a row does not
    depend on how many rows come with it: fewer than MIN_GEMM_ROWS rows are padded up to it
    (a GEMM of a few rows is bound by reading the weight)."""
    m = x.shape[0]
    if 0 < m < MIN_GEMM_ROWS:
        return F.linear(F.pad(x, (0, 0, 0, MIN_GEMM_ROWS - m)), weight)[:m]
    return F.linear(x, weight)


def requantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float [N, K] weight -> group-32 min/max (q, scale, zero) for ``pack_int4`` (lossy)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((groups - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo + 8 * scale


def requantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float [N, K] weight -> per-row symmetric int8 (q int8 [N, K], scale float32 [N]) (lossy)."""
    scale = weight.float().abs().amax(1) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(weight.float() * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class QuantizedLMHead(Int4Linear):
    """The LM head of a quantized model: float32 logits, kernel chosen by M.

    M >= ``head_dense_min_rows``: dense ``config.dense_dtype`` (the dequantized checkpoint
    weight, shared with the embeddings when they are tied and float32). Smaller M:
    ``config.head`` (see ``QuantizationConfig``); a 4-bit checkpoint head always runs int4.
    ``weight`` stays float32 either way: the exact top logits are computed from it.
    """

    def __init__(self, in_features: int, out_features: int, config: QuantizationConfig):
        super().__init__(in_features, out_features, dense_min_rows=config.head_dense_min_rows,
                         dense_dtype=config.dense_dtype, native=config.native)
        self.gemm_weight: torch.Tensor | None = None  # `weight` in dense_dtype
        self.kernel = config.head
        self.exact_top = min(config.head_exact_top, out_features)
        # top-k in two stages (block maxima, then the best blocks): ~3x faster than topk
        # over the whole vocabulary on CPU
        self._block = next((b for b in (128, 64, 32) if out_features % b == 0 and out_features // b >= 4 * self.exact_top), 0)
        self._token_ids = torch.arange(out_features).view(-1, self._block) if self._block and self.exact_top else None
        self.int8_weight: torch.Tensor | None = None
        self.int8_scales: torch.Tensor | None = None
        self._int8_native = None  # the native int8 kernel, when built and asked for

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kernel={self.small_kernel}, dense_min_rows={self.dense_min_rows}")

    @property
    def small_kernel(self) -> str:
        return "int4" if self.packed is not None else "int8" if self.int8_weight is not None else "dense"

    def finish_loading(self, dense_weight: torch.Tensor | None = None) -> None:
        """dense_weight: the float32 weight when it already exists (tied embeddings)."""
        (source,) = [self._pending[s] for s in self.shard_sizes if s in self._pending] or [None]
        if source is None:
            raise ValueError("the LM head weight was never loaded")
        self._pending = {}
        if dense_weight is None:
            dense_weight = source.dequantize() if isinstance(source, QuantizedTensor) else source.float()
        self.weight = dense_weight
        self.gemm_weight = dense_weight.to(self.dense_dtype)  # the same tensor for float32
        if isinstance(source, QuantizedTensor) and source.int4_mappable:
            self.packed, self.scale_zeros = pack_int4(*source.int4_groups())
        elif self.kernel == "int4" and self.in_features % GROUP_SIZE == 0:
            self.packed, self.scale_zeros = pack_int4(*requantize_int4(dense_weight))
        elif self.kernel == "int8":
            self.int8_weight, scales = requantize_int8(dense_weight)
            kernels = native.kernels() if self.native and self.in_features % 32 == 0 else None
            self._int8_native = kernels.int8_linear if kernels is not None else None
            # float32 scales for the native kernel (float32 x), bfloat16 for torch's
            self.int8_scales = scales if self._int8_native is not None else scales.to(INT4_ACT_DTYPE)
        else:
            self.dense_min_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.dense_min_rows:
            logits = row_invariant_linear(x.to(self.gemm_weight.dtype), self.gemm_weight).float()
            if self.exact_top and (self.dense_min_rows > 0 or self.gemm_weight is not self.weight):
                # the top logits computed exactly as the small-M path does, so a row's greedy
                # pick and top logprobs do not depend on which kernel its step used (nor on
                # a bfloat16 GEMM's rounding)
                self._recompute_top(logits, x)
            return logits
        if self.packed is not None:
            logits = int4_mm(x, self.packed, self.scale_zeros).float()
        elif self._int8_native is not None:
            logits = self._int8_native(x, self.int8_weight, self.int8_scales)
        else:
            logits = torch.ops.aten._weight_int8pack_mm(
                x.to(INT4_ACT_DTYPE), self.int8_weight, self.int8_scales).float()
        if self.exact_top:
            self._recompute_top(logits, x)
        return logits

    def _recompute_top(self, logits: torch.Tensor, x: torch.Tensor) -> None:
        """Overwrite each row's top ``exact_top`` logits with float32 row dot products."""
        top = self._top_indices(logits)  # [M, k]
        exact = torch.bmm(self.weight[top], x.float().unsqueeze(-1)).squeeze(-1)
        logits.scatter_(1, top, exact)

    def _top_indices(self, logits: torch.Tensor) -> torch.Tensor:
        """Indices of each row's ``exact_top`` largest logits (in no particular order)."""
        k, b = self.exact_top, self._block
        if not b:
            return logits.topk(k, dim=-1, sorted=False).indices
        m = logits.shape[0]
        blocks = logits.view(m, -1, b)
        # the k best tokens lie in the k blocks with the largest maxima
        best = blocks.amax(2).topk(k, dim=1, sorted=False).indices  # [M, k]
        candidates = blocks.gather(1, best.unsqueeze(-1).expand(m, k, b)).view(m, k * b)
        within = candidates.topk(k, dim=1, sorted=False).indices
        return self._token_ids[best].view(m, k * b).gather(1, within)
