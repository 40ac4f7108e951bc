"""The LM head of a quantized model: float32 logits, kernel chosen by M (rows).

A dense GEMM for many rows; for few, a kernel that reads fewer weight bytes (int8 rows
requantized from the checkpoint weight, or int4), with each row's top logits recomputed
exactly so that greedy picks and top logprobs do not depend on the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2serve import native
from k2serve.models.layers.gguf_blocks import GROUP_SIZE, QuantizedTensor
from k2serve.models.layers.int4_linear import (
    INT4_ACT_DTYPE,
    Int4Linear,
    int4_mm,
    pack_int4,
    requantize_int4,
)
from k2serve.models.layers.quantization import QuantizationConfig

# MKL runs 1 row as a GEMV and 2-3 rows through another small-M kernel, each summing in its
# own order: on AMD (AVX2 and Zen 4) a row of the LM head's float32 GEMM then differs with
# M. From 4 rows on it runs one algorithm for the head's shape (measured: M = 4..300 bitwise
# equal on an AVX2 EPYC; Intel's agreed from 1). Not so for every shape: a 96 x 256 weight
# gives other sums at M = 5 than at M = 8.
MIN_GEMM_ROWS = 4


def row_invariant_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for the LM head's dense path, whose result for a row does not
    depend on how many rows come with it: fewer than MIN_GEMM_ROWS rows are padded up to it
    (a GEMM of a few rows is bound by reading the weight)."""
    m = x.shape[0]
    if 0 < m < MIN_GEMM_ROWS:
        return F.linear(F.pad(x, (0, 0, 0, MIN_GEMM_ROWS - m)), weight)[:m]
    return F.linear(x, weight)


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
