"""``load_model(path)``: a GGUF file or an HF safetensors directory -> (model, config)."""

from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm

from k2serve.models.config import ModelConfig
from k2serve.models.deepseek_config import DeepseekV3Config, is_deepseek_v3
from k2serve.models.deepseek_v3 import DeepseekV3ForCausalLM
from k2serve.models.idefics3 import Idefics3Config, Idefics3ForConditionalGeneration
from k2serve.models.layers.quantization import QuantizationConfig
from k2serve.models.llama import LlamaForCausalLM

MODEL_CLASSES = {"llama": LlamaForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM,
                 "idefics3": Idefics3ForConditionalGeneration}


def config_from_hf(hf_config: dict):
    """config.json -> DeepseekV3Config (model_type kimi_k2 / deepseek_v3, or the
    DeepseekV3ForCausalLM architecture), Idefics3Config (model_type idefics3), else
    ModelConfig (Llama family)."""
    if is_deepseek_v3(hf_config):
        return DeepseekV3Config.from_hf_config(hf_config)
    if hf_config.get("model_type") == "idefics3":  # SmolVLM: vision encoder + Llama
        return Idefics3Config.from_hf_config(hf_config)
    return ModelConfig.from_hf_config(hf_config)


def open_checkpoint(path: str):
    """A checkpoint reader with ``config``, ``names``, ``source_name()`` and ``iter_tensors()``."""
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path}: unsupported model file (expected a .gguf file or an HF directory)")
        from k2serve.models.loaders.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if os.path.isdir(path):
        from k2serve.models.loaders.compressed_tensors import (
            PackQuantizedCheckpoint,
            is_compressed_tensors_checkpoint,
        )
        from k2serve.models.loaders.fp8 import (
            FP8BlockCheckpoint,
            is_fp8_block_checkpoint,
        )
        from k2serve.models.loaders.safetensors import SafetensorsCheckpoint

        checkpoint = SafetensorsCheckpoint(path, config_from_hf)
        if is_fp8_block_checkpoint(checkpoint.hf_config):  # dequantized shard by shard
            checkpoint = FP8BlockCheckpoint(checkpoint)
        elif is_compressed_tensors_checkpoint(checkpoint.hf_config):  # K2-Thinking's INT4
            checkpoint = PackQuantizedCheckpoint(checkpoint)
        return checkpoint
    raise ValueError(f"{path}: no such model file or directory")


def load_model(path: str, dtype: torch.dtype = torch.float32, progress: bool = True,
               quantized: bool | QuantizationConfig = False) -> tuple[nn.Module, ModelConfig]:
    """quantized: keep a GGUF's 4-bit weights 4-bit (True: default ``QuantizationConfig``),
    or a pack-quantized (compressed-tensors) DeepSeek-V3's routed experts; the model still
    takes and returns float32. False: every weight dense in ``dtype``."""
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    model_class = MODEL_CLASSES.get(config.architecture)
    if model_class is None:
        raise ValueError(f"{path}: unsupported architecture {config.architecture!r}")
    quantization = None
    if quantized:
        quantization = quantized if isinstance(quantized, QuantizationConfig) else QuantizationConfig()
        if model_class is DeepseekV3ForCausalLM and not getattr(checkpoint, "keeps_quantized", False):
            raise ValueError(f"{path}: quantized loading of a DeepSeek-V3 model needs 4-bit experts "
                             "(a compressed-tensors pack-quantized checkpoint)")
        model = model_class(config, dtype, quantization=quantization)
    else:
        model = model_class(config, dtype)

    available = set(checkpoint.names)
    missing = [checkpoint.source_name(n) for n in model.checkpoint_weight_names() if n not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{path}: missing tensor {missing[0]!r}{more}")

    bar = tqdm(total=len(checkpoint), desc=f"Loading {os.path.basename(os.path.normpath(path))}",
               unit="tensor", disable=not progress)
    if quantization is not None and getattr(checkpoint, "keeps_quantized", False):
        tensors = checkpoint.iter_tensors(keep_quantized=True)  # GGUF: raw 4-bit blocks
    else:
        tensors = checkpoint.iter_tensors()  # float tensors: quantized layers run them dense
    with bar:
        for name, tensor in tensors:
            try:
                model.load_weight(name, tensor)
            except ValueError as e:
                source = checkpoint.source_name(name)
                prefix = f"{path}: " if source == name else f"{path}: {source!r} -> "
                raise ValueError(prefix + str(e)) from None
            bar.update(1)
    if quantization is not None:
        try:
            model.finish_loading()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    model.eval()
    return model, config
