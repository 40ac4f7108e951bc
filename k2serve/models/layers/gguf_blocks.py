"""GGUF tensors kept as raw quantized blocks, and their 4-bit block formats as int4 codes.

GGUF's 4-bit block formats dequantize per block of 32 weights as an affine map of a 4-bit
code q in [0, 15]:

- Q4_1: ``w = d * q + m``                      (fp16 d, m per block)
- Q4_0: ``w = d * (q - 8)``                    (fp16 d per block)
- Q4_K: ``w = (d * sc) * q - dmin * mn``       (per 32-weight sub-block of a 256 super-block)

i.e. ``w = scale * q + min`` per group (``QuantizedTensor.int4_affine``), the form the int4
kernels run (``int4_linear.py``). Tensors of other types (Q5_x, Q6_K, Q8_0, F16, F32, ...)
only dequantize, to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
GROUP_SIZE = 32  # every mapped GGUF format has 32-weight (sub-)blocks


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
