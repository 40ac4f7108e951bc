"""How a quantized model runs its linears (``QuantizationConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2serve.models.layers.int4_linear import DEFAULT_DENSE_MIN_ROWS

# Rows from which the Q8_0 LM head uses the dense float32 GEMM rather than the int8 kernel.
DEFAULT_HEAD_DENSE_MIN_ROWS = 8


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
      linears with ours (AMX tiles, else AVX-512/AVX2 integer dots); False: torch's kernels.
    dense_dtype: the dtype of the dense copies and their GEMMs (the LM head's too), float32
      or bfloat16 (see ``fast_bfloat16_gemm``). Layers with no int4 form stay float32.
    expert_dense_min_rows: a 4-bit routed expert's (DeepSeek-V3 / K2-Thinking): tokens routed
      to it in a step from which it uses a dense float32 copy (0: always, float32 compute;
      None: the int4 kernel always and no copy, 4-bit memory only).
    """

    dense_min_rows: int | None = DEFAULT_DENSE_MIN_ROWS
    dense_copy: bool = False  # keep the dense copy even with dense_min_rows=None (row plans)
    head: str = "int8"
    head_dense_min_rows: int = DEFAULT_HEAD_DENSE_MIN_ROWS
    head_exact_top: int = 16
    native: bool = True
    dense_dtype: torch.dtype = torch.float32
    expert_dense_min_rows: int | None = None

    def __post_init__(self):
        if self.head not in ("int8", "int4", "dense"):
            raise ValueError(f"unknown LM head kernel {self.head!r} (int8, int4 or dense)")
        if self.dense_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dense_dtype must be float32 or bfloat16, not {self.dense_dtype}")


def fast_bfloat16_gemm() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16), where
    oneDNN's bfloat16 GEMM beats float32's; elsewhere bfloat16 is emulated and slower."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
