"""FP8 block-quantized HF checkpoints (DeepSeek-V3 / Kimi K2): dequantize while loading.

A quantized linear stores ``X.weight`` (float8_e4m3fn, [out, in]) and
``X.weight_scale_inv`` (float32, [ceil(out/bo), ceil(in/bi)], bo x bi = weight_block_size,
128 x 128) with W = fp8.float() * scale_inv over each block. config.json says so with
``quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], ...}``.
Embeddings, lm_head, norms and the router stay bf16/fp32 and pass through unchanged.

``FP8BlockCheckpoint`` wraps a ``SafetensorsCheckpoint``: tensors come out shard by shard,
each FP8 weight paired with its scale (read from whichever shard holds it; safetensors
maps files, so only the pages read are touched) and dequantized to float32 one at a
time, so peak memory is the model plus one shard plus one float32 weight.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open

SCALE_SUFFIX = "_scale_inv"  # "X.weight" -> "X.weight_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_E4M3_MAX = 448.0


def is_fp8_block_checkpoint(hf_config: dict) -> bool:
    quant = hf_config.get("quantization_config") or {}
    return quant.get("quant_method") == "fp8"


def block_size_of(hf_config: dict) -> tuple[int, int]:
    block = (hf_config.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
    if len(block) != 2:
        raise ValueError(f"unsupported weight_block_size {block!r} (expected [rows, cols])")
    return int(block[0]), int(block[1])


def scale_shape(weight_shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(weight_shape[0] / block[0]), math.ceil(weight_shape[1] / block[1])


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor,
                          block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp8 [out, in] and block scales [ceil(out/bo), ceil(in/bi)] -> float32 [out, in]."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    expected = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"expected block scales of shape {expected} for a weight of shape "
                         f"{tuple(weight.shape)} with {block[0]}x{block[1]} blocks, got {tuple(scale_inv.shape)}")
    out_f, in_f = weight.shape
    (bo, bi), (nbo, nbi) = block, expected
    w = weight.to(torch.float32)
    padded = (nbo * bo, nbi * bi) != (out_f, in_f)
    if padded:  # partial edge blocks: pad, scale, crop
        w = F.pad(w, (0, nbi * bi - in_f, 0, nbo * bo - out_f))
    w.view(nbo, bo, nbi, bi).mul_(scale_inv.to(torch.float32)[:, None, :, None])
    return w[:out_f, :in_f].contiguous() if padded else w


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8_e4m3fn weight, float32 scale_inv [ceil(out/bo), ceil(in/bi)]), each
    block's absolute maximum mapped to 448 (DeepSeek's recipe; for writing test checkpoints).

    Elementwise, |W - dequantize(quantize(W))| <= max(2^-4 |W|, 2^-10 scale_inv): e4m3 keeps
    3 mantissa bits (round to nearest: relative error <= 2^-4) down to 2^-6, below which its
    subnormals are spaced 2^-9 apart (absolute error <= 2^-10, in units of the block scale).
    """
    out_f, in_f = weight.shape
    (bo, bi), (nbo, nbi) = block, scale_shape(tuple(weight.shape), block)
    w = F.pad(weight.to(torch.float32), (0, nbi * bi - in_f, 0, nbo * bo - out_f)).view(nbo, bo, nbi, bi)
    amax = w.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (w / scale_inv[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(nbo * bo, nbi * bi)[:out_f, :in_f].contiguous(), scale_inv


class FP8BlockCheckpoint:
    """A ``SafetensorsCheckpoint`` whose FP8 weights come out dequantized (float32)."""

    def __init__(self, inner):
        self.inner = inner
        self.path, self.hf_config, self.config = inner.path, inner.hf_config, inner.config
        self.block = block_size_of(inner.hf_config)
        weight_map = inner.weight_map
        for name in weight_map:
            if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] not in weight_map:
                raise ValueError(f"{self.path}: scale {name!r} has no weight "
                                 f"{name[:-len(SCALE_SUFFIX)]!r}")
        self.weight_map = {n: s for n, s in weight_map.items() if not n.endswith(SCALE_SUFFIX)}

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def source_name(self, name: str) -> str:
        return self.inner.source_name(name)

    def __len__(self) -> int:
        return len(self.weight_map)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        files = _ShardFiles(self.path)
        try:
            for shard in sorted(by_shard):
                for name in by_shard[shard]:
                    tensor = files.get(name, shard)
                    if tensor.dtype in FP8_DTYPES:
                        tensor = self._dequantize(name, tensor, files)
                    yield name, tensor
                files.close(shard)  # a scale stored here for a later weight reopens it
        finally:
            files.close_all()

    def _dequantize(self, name: str, weight: torch.Tensor, files: _ShardFiles) -> torch.Tensor:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.inner.weight_map:
            raise ValueError(f"{self.path}: missing tensor {scale_name!r} (the block scales of FP8 weight {name!r})")
        scale = files.get(scale_name, self.inner.weight_map[scale_name])
        try:
            return dequantize_fp8_blocks(weight, scale, self.block)
        except ValueError as e:
            raise ValueError(f"{self.path}: tensor {scale_name!r}: {e}") from None


class _ShardFiles:
    """Shard files opened on demand (memory-mapped by safetensors) and kept until closed."""

    def __init__(self, path: str):
        self.path = path
        self.handles: dict[str, tuple[object, set[str]]] = {}

    def get(self, name: str, shard: str) -> torch.Tensor:
        if shard not in self.handles:
            handle = safe_open(os.path.join(self.path, shard), framework="pt")
            self.handles[shard] = (handle, set(handle.keys()))
        handle, keys = self.handles[shard]
        if name not in keys:
            raise ValueError(f"{self.path}: tensor {name!r} is not in shard {shard!r}")
        return handle.get_tensor(name)

    def close(self, shard: str) -> None:
        self.handles.pop(shard, None)

    def close_all(self) -> None:
        self.handles.clear()
