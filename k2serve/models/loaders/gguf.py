"""Read llama.cpp GGUF files: metadata, config and dequantized tensors under HF names.

Every tensor goes through ``dequantize_tensor`` (``gguf.quants.dequantize``), so any type
gguf-py can dequantize works (F32/F16/BF16/Q4_0/Q4_1/Q5_x/Q8_0/K-quants, ...).
With ``keep_quantized=True`` the 2-D quantized tensors come out as ``QuantizedTensor`` (the
raw blocks, q/k rows un-permuted) for a quantized model to pack as it likes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
import torch

from k2serve.models.config import ModelConfig
from k2serve.models.layers.gguf_blocks import QuantizedTensor
from k2serve.models.llama import ROPE_FREQ_FACTORS

_GLOBAL = {  # GGUF name -> HF name
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": ROPE_FREQ_FACTORS,
}
_BLOCK = {  # blk.N.<GGUF>.weight -> model.layers.N.<HF>.weight
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
    return None


def hf_to_gguf_name(name: str) -> str:
    for gguf_name, hf_name in _GLOBAL.items():
        if name == hf_name:
            return gguf_name
    m = _HF_BLOCK_RE.fullmatch(name)
    if m:
        for gguf_name, hf_module in _BLOCK.items():
            if hf_module == m.group(2):
                return f"blk.{m.group(1)}.{gguf_name}.weight"
    return name


def gguf_metadata(reader) -> dict[str, Any]:
    """All key/value metadata of a GGUFReader as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUFReader tensor as a float32 array in row-major (HF) shape."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"GGUF tensor {tensor.name!r}: unsupported type {tensor.tensor_type.name}") from None
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    return array if array.flags.writeable else array.copy()  # F32 comes back as a view of the mmap


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf ``permute`` of attn_q/attn_k rows.

    llama.cpp reorders each head's rows from HF's rotate-half layout to interleaved pairs;
    this restores HF order. Works on any array whose first axis is the output rows.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


class GGUFCheckpoint:
    """A GGUF file opened for loading: ``config``, ``metadata`` and tensors under HF names."""

    keeps_quantized = True  # iter_tensors(keep_quantized=True) gives raw quantized blocks

    def __init__(self, path: str):
        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.metadata = gguf_metadata(self.reader)
        self.config = ModelConfig.from_gguf_metadata(self.metadata, [t.name for t in self.reader.tensors])
        self._tensors = {}
        for t in self.reader.tensors:
            hf_name = gguf_to_hf_name(t.name)
            if hf_name is None:
                raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r} for a Llama model")
            self._tensors[hf_name] = t

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def source_name(self, name: str) -> str:
        """The GGUF name of a tensor, for messages."""
        return hf_to_gguf_name(name)

    def __len__(self) -> int:
        return len(self._tensors)

    def load_tensor(self, name: str, keep_quantized: bool = False) -> torch.Tensor | QuantizedTensor:
        """A tensor by HF name: float32, or (``keep_quantized``, a 2-D block-quantized GGUF
        tensor) its raw blocks as a ``QuantizedTensor``."""
        tensor = self._tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if keep_quantized and len(shape) == 2 and gguf.GGML_QUANT_SIZES[tensor.tensor_type][0] > 1:
            data = np.asarray(tensor.data)
            array = QuantizedTensor(tensor.tensor_type, shape, data.reshape(shape[0], -1), tensor.name)
        else:
            array = dequantize_tensor(tensor)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            n_head = self.config.num_heads if "q_proj" in name else self.config.num_kv_heads
            if len(shape) != 2 or shape[0] % (2 * n_head):
                raise ValueError(f"GGUF tensor {tensor.name!r}: shape {shape} does not fit {n_head} heads")
            if isinstance(array, QuantizedTensor):  # blocks sit inside rows: permute raw rows
                return array.permute_rows(lambda rows: unpermute_qk(rows, n_head))
            array = unpermute_qk(array, n_head)
        return array if isinstance(array, QuantizedTensor) else torch.from_numpy(array)

    def iter_tensors(self, keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        for name in self._tensors:
            yield name, self.load_tensor(name, keep_quantized)
