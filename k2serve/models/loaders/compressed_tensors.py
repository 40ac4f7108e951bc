"""compressed-tensors "pack-quantized" INT4 checkpoints (Kimi K2-Thinking): experts stay 4-bit.

The format, as compressed-tensors 0.20 writes and reads it (``PackedQuantizationCompressor``,
``pack_to_int32`` / ``unpack_from_int32``): a quantized linear ``X`` stores

- ``X.weight_packed``: int32 [out, in / 8], eight 4-bit codes per word, the i-th code of a
  word in bits 4i..4i+3, each code the signed value plus 8 (0..15);
- ``X.weight_scale``: [out, in / group_size] (bfloat16 in K2-Thinking), one per group;
- ``X.weight_shape``: [out, in];
- ``X.weight_zero_point`` only when asymmetric (not supported here).

Symmetric int4 dequantizes to ``w = (code - 8) * scale``, which is our int4 kernels' form
``w = scale * code + min`` with ``min = -8 * scale`` (torch's ``zero = min + 8 scale = 0``):
group 32 maps onto them exactly, as GGUF's Q4_0 does, and so does any multiple of 32 (its
scale repeated). ``config.json``'s ``quantization_config`` decides which linears are packed
(``config_groups[*].targets`` minus ``ignore``, matched as compressed-tensors does:
``re:`` prefix = ``re.match``, else the exact module name); a checkpoint that disagrees with
it, or a scheme we do not run (bits, type, asymmetric, strategy, group size, activation
quantization, act-order ``g_idx``), is a ``ValueError`` naming the tensor or the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from k2serve.models.layers.gguf_blocks import GROUP_SIZE
from k2serve.models.loaders.fp8 import _ShardFiles

PACKED, SCALE, SHAPE = ".weight_packed", ".weight_scale", ".weight_shape"
UNSUPPORTED_PARTS = (".weight_zero_point", ".weight_g_idx", ".input_global_scale",
                     ".weight_global_scale")
CODES_PER_WORD = 8  # 4-bit codes in an int32


def is_compressed_tensors_checkpoint(hf_config: dict) -> bool:
    quant = hf_config.get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors"


@dataclass(frozen=True)
class PackQuantizedScheme:
    """What a K2-Thinking-style ``quantization_config`` says: which linears are packed and
    their group size (the rest of the scheme is fixed: symmetric int4, per group)."""

    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    group_size: int

    @classmethod
    def from_hf_config(cls, hf_config: dict) -> PackQuantizedScheme:
        quant = hf_config.get("quantization_config") or {}
        fmt = quant.get("format")
        groups = quant.get("config_groups") or {}
        if not groups:
            raise ValueError("quantization_config.config_groups is empty")
        targets, group_size = [], None
        for key, group in groups.items():
            where = f"quantization_config.config_groups.{key}"
            if (group.get("format") or fmt) != "pack-quantized":
                raise ValueError(f"{where}: unsupported compressed-tensors format "
                                 f"{group.get('format') or fmt!r} (only pack-quantized)")
            if group.get("input_activations") or group.get("output_activations"):
                raise ValueError(f"{where}: activation quantization is not supported "
                                 "(weight-only int4)")
            w = group.get("weights") or {}
            expected = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
            for field, value in expected.items():
                if w.get(field) != value:
                    raise ValueError(f"{where}.weights.{field} = {w.get(field)!r} is not supported "
                                     f"(expected {value!r}: symmetric int4 per group)")
            if w.get("actorder") not in (None, "static"):
                raise ValueError(f"{where}.weights.actorder = {w['actorder']!r} is not supported")
            size = w.get("group_size")
            if not isinstance(size, int) or size <= 0 or size % GROUP_SIZE:
                raise ValueError(f"{where}.weights.group_size = {size!r} is not supported "
                                 f"(a multiple of {GROUP_SIZE})")
            if group_size not in (None, size):
                raise ValueError(f"{where}.weights.group_size = {size}: every group must share one size")
            group_size = size
            targets += list(group.get("targets") or [])
        return cls(tuple(targets), tuple(quant.get("ignore") or ()), group_size)

    def quantizes(self, module: str) -> bool:
        """Whether the config packs linear ``module`` (a checkpoint module name)."""
        targeted = any(t == "Linear" or _match(module, t) for t in self.targets)
        return targeted and not any(_match(module, pattern) for pattern in self.ignore)


def _match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def is_linear_weight(name: str) -> bool:
    """A linear's weight by name (``*_proj.weight``, ``lm_head.weight``); the router
    (``mlp.gate``) is not an ``nn.Linear`` in DeepSeek-V3's modelling code."""
    module, _, leaf = name.rpartition(".")
    last = module.rpartition(".")[2]
    return leaf == "weight" and (last.endswith("_proj") or last == "lm_head")


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 [rows, ceil(columns / 8)] -> uint8 codes [rows, columns] (0..15, signed + 8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    codes = (packed[..., None] >> shifts) & 0xF
    return codes.reshape(packed.shape[0], -1)[:, :columns].to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, columns] (0..15) -> int32 [rows, ceil(columns / 8)] (our packer,
    checked bitwise against compressed-tensors' ``pack_to_int32`` in the tests)."""
    rows, columns = codes.shape
    pad = -columns % CODES_PER_WORD
    words = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(rows, -1, CODES_PER_WORD)
    packed = (words << torch.arange(0, 32, 4, dtype=torch.int64)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def quantize_int4_symmetric(weight: torch.Tensor, group_size: int = GROUP_SIZE
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (codes uint8 0..15, bfloat16 scales [out, in / group]): compressed-tensors'
    symmetric minmax int4 (scale = absmax / 7.5, q = clamp(round(w / scale), -8, 7)), with the
    scale rounded to bfloat16 first so that (code - 8) * scale is the weight the model runs."""
    out_f, in_f = weight.shape
    groups = weight.float().view(out_f, in_f // group_size, group_size)
    scale = (groups.abs().amax(-1) / 7.5).to(torch.bfloat16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / scale.float()[..., None]).clamp_(-8, 7)
    return (q + 8).to(torch.uint8).view(out_f, in_f), scale


@dataclass
class PackedInt4Tensor:
    """One pack-quantized weight, kept 4-bit: the ``Int4Linear`` source interface
    (``shape``, ``int4_mappable``, ``int4_affine()``, ``dequantize()``)."""

    name: str  # the checkpoint's X.weight_packed
    packed: torch.Tensor  # int32 [out, in / 8]
    scale: torch.Tensor  # [out, in / group_size], as stored
    shape: tuple[int, int]
    group_size: int

    @property
    def int4_mappable(self) -> bool:
        return self.shape[1] % GROUP_SIZE == 0

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed, self.shape[1])

    def group_scales(self) -> torch.Tensor:
        """float32 [out, in / 32]: the stored scales (exact in float32), one per 32 columns."""
        return self.scale.float().repeat_interleave(self.group_size // GROUP_SIZE, dim=1)

    def int4_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, min) with w = scale * code + min per 32-column group (min = -8 scale)."""
        scale = self.group_scales()
        return self.codes(), scale, -8 * scale

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: (code - 8) * scale, exact (a 4-bit integer times a bfloat16)."""
        out_f, in_f = self.shape
        q = self.codes().to(torch.float32) - 8
        return (q.view(out_f, -1, GROUP_SIZE) * self.group_scales()[..., None]).view(out_f, in_f)


class PackQuantizedCheckpoint:
    """A ``SafetensorsCheckpoint`` whose packed weights come out as ``X.weight``: a
    ``PackedInt4Tensor`` (``keep_quantized``) or dequantized float32."""

    keeps_quantized = True

    def __init__(self, inner):
        self.inner = inner
        self.path, self.hf_config, self.config = inner.path, inner.hf_config, inner.config
        try:
            self.scheme = PackQuantizedScheme.from_hf_config(inner.hf_config)
        except ValueError as e:
            raise ValueError(f"{self.path}: config.json: {e}") from None
        stored = inner.weight_map
        self.weight_map: dict[str, str] = {}  # logical name -> shard
        self._packed: dict[str, str] = {}  # X.weight -> X (module) for packed weights
        for name, shard in stored.items():
            if name.endswith((SCALE, SHAPE)):
                if name.rpartition(".")[0] + PACKED not in stored:
                    raise ValueError(f"{self.path}: tensor {name!r} has no {PACKED[1:]!r} beside it")
                continue
            if name.endswith(UNSUPPORTED_PARTS):
                raise ValueError(f"{self.path}: tensor {name!r}: not supported (symmetric int4 "
                                 "without act-order or global scales only)")
            if name.endswith(PACKED):
                module = name[:-len(PACKED)]
                if not self.scheme.quantizes(module):
                    raise ValueError(f"{self.path}: tensor {name!r} is packed, but config.json's "
                                     f"quantization_config does not quantize {module!r} "
                                     "(ignored or not targeted)")
                for part in (SCALE, SHAPE):
                    if module + part not in stored:
                        raise ValueError(f"{self.path}: missing tensor {module + part!r} "
                                         f"(for packed weight {name!r})")
                self._packed[module + ".weight"] = module
                self.weight_map[module + ".weight"] = shard
                continue
            if is_linear_weight(name) and self.scheme.quantizes(name.rpartition(".")[0]):
                raise ValueError(f"{self.path}: tensor {name!r} is stored unpacked, but config.json's "
                                 f"quantization_config quantizes {name.rpartition('.')[0]!r} "
                                 "(add it to ignore, or pack it)")
            self.weight_map[name] = shard

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def source_name(self, name: str) -> str:
        module = self._packed.get(name)
        return self.inner.source_name(name if module is None else module + PACKED)

    def __len__(self) -> int:
        return len(self.weight_map)

    def iter_tensors(self, keep_quantized: bool = False) -> Iterator[tuple[str, object]]:
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        files = _ShardFiles(self.path)
        try:
            for shard in sorted(by_shard):
                for name in by_shard[shard]:
                    module = self._packed.get(name)
                    if module is None:
                        yield name, files.get(name, shard)
                        continue
                    tensor = self._read_packed(module, files)
                    yield name, tensor if keep_quantized else tensor.dequantize()
                files.close(shard)
        finally:
            files.close_all()

    def _read_packed(self, module: str, files: _ShardFiles) -> PackedInt4Tensor:
        stored = self.inner.weight_map
        packed, scale, shape = (files.get(module + part, stored[module + part])
                                for part in (PACKED, SCALE, SHAPE))
        name, group = module + PACKED, self.scheme.group_size
        if shape.numel() != 2:
            raise ValueError(f"{self.path}: tensor {module + SHAPE!r}: expected [out, in], "
                             f"got {shape.tolist()}")
        out_f, in_f = (int(v) for v in shape.tolist())
        if packed.dtype != torch.int32 or tuple(packed.shape) != (out_f, -(-in_f // CODES_PER_WORD)):
            raise ValueError(f"{self.path}: tensor {name!r}: expected int32 of shape "
                             f"{(out_f, -(-in_f // CODES_PER_WORD))} for a [{out_f}, {in_f}] weight, "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        if in_f % group:
            raise ValueError(f"{self.path}: tensor {name!r}: {in_f} columns are not a whole "
                             f"number of {group}-column groups")
        if not scale.is_floating_point() or tuple(scale.shape) != (out_f, in_f // group):
            raise ValueError(f"{self.path}: tensor {module + SCALE!r}: expected float scales of "
                             f"shape {(out_f, in_f // group)} (group size {group}), got "
                             f"{scale.dtype} {tuple(scale.shape)}")
        return PackedInt4Tensor(name, packed, scale, (out_f, in_f), group)
