"""Build a servable text model (weights + tokenizer + template + engine) from a path."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from k2serve import native
from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig, parse_speculative
from k2serve.engine.core import EngineCore
from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.models.layers.quantization import QuantizationConfig, fast_bfloat16_gemm
from k2serve.models.loader import load_model
from k2serve.models.loaders.compressed_tensors import is_compressed_tensors_checkpoint
from k2serve.serving.catalog import CATALOG, EMBEDDED_CHAT_MODEL_ID, model_spec
from k2serve.serving.registry import ModelSpec
from k2serve.serving.text_backend import TextBackend
from k2serve.serving.vision import VisionPrompter, vision_config
from k2serve.structured import compiler_for
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.loading import load_tokenizer

# Kernels chosen so that a sequence's greedy tokens do not depend on what else is in the
# batch (the engine's batch-invariance guarantee, tested): a token's linears never switch
# kernel with the step's row count — int4 for generated tokens and short prompts, the dense
# copy in fixed-size row tiles for the prompt tokens of long prompts
# (EngineConfig.dense_prompt_min_tokens). The LM head runs int8 for few rows and dense for
# many (the int8 kernel costs the same per row at any M), with each row's top 16 logits
# recomputed exactly (float32) either way, so greedy picks and top logprobs match. Dense
# GEMMs run in bfloat16 where the CPU has it natively (AMX / AVX512-BF16): the head goes
# dense from 8 rows there. Elsewhere they run float32, and the 49152 x 576 head's float32
# GEMM lost to the int8 kernel up to 256 rows (AMD EPYC Zen 3, 2 threads: 32 rows 32 vs 14
# ms, 128 rows 70 vs 51 ms, 256 rows 131 vs 128 ms).
_BFLOAT16_GEMM = fast_bfloat16_gemm()
SERVING_QUANTIZATION = QuantizationConfig(
    dense_min_rows=None, dense_copy=True, head_dense_min_rows=8 if _BFLOAT16_GEMM else 256,
    dense_dtype=torch.bfloat16 if _BFLOAT16_GEMM else torch.float32)


# --kv-cache-dtype: "auto" is the model's choice (bfloat16 for 4-bit GGUF weights, whose
# linears take bfloat16 activations; float32 otherwise)
KV_CACHE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadOptions:
    model_path: str | None = None  # None: the embedded SmolLM2 GGUF
    served_model_name: str | None = None
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_step_tokens: int = EngineConfig.max_step_tokens
    max_context_length: int | None = None  # cap below the model's own, to bound memory
    kv_cache_bytes: int | None = EngineConfig.kv_cache_bytes
    quantize: bool = True  # keep a GGUF's 4-bit weights 4-bit (int4 kernels), K2-Thinking's experts
    max_waiting: int = EngineConfig.max_waiting
    progress: bool = True
    kv_cache_dtype: str = "auto"  # a KV_CACHE_DTYPES key
    speculative: str | None = None  # None, "ngram" or "draft:MODEL" (parse_speculative)
    num_speculative_tokens: int = EngineConfig.num_speculative_tokens


def load_text_model(options: LoadOptions) -> tuple[ModelSpec, TextBackend]:
    path = options.model_path or embedded_smollm2_gguf_path()
    quantized = SERVING_QUANTIZATION if options.quantize and _has_4bit_weights(path) else False
    tokenizer = load_tokenizer(path)  # GGUF metadata, tiktoken (K2) or HF tokenizer.json
    template = ChatTemplate.from_tokenizer(tokenizer) if tokenizer.chat_template else None
    vision = vision_config(path)  # an Idefics3 (SmolVLM) checkpoint: images in chat
    prompter = VisionPrompter.from_checkpoint(path, tokenizer, vision) if vision else None
    method, draft_path = parse_speculative(options.speculative)
    if draft_path is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(draft_path), draft_path)

    def build_core() -> EngineCore:  # runs on the engine's own thread (see AsyncEngine)
        if options.progress and native.enabled():
            print("k2serve: loading native kernels (built once on first use, 1-2 minutes)",
                  file=sys.stderr, flush=True)
        native.kernels()  # before the weights: the int4 linears pack for the kernel they get
        model, config = load_model(path, dtype=torch.float32, progress=options.progress,
                                   quantized=quantized)
        model.eval()
        draft = None
        if draft_path is not None:
            draft_quantized = SERVING_QUANTIZATION if options.quantize and draft_path.endswith(
                ".gguf") else False
            draft, _ = load_model(draft_path, dtype=torch.float32, progress=options.progress,
                                  quantized=draft_quantized)
        context_length = config.context_length
        if options.max_context_length:
            context_length = min(context_length, options.max_context_length)
        core = EngineCore(model, EngineConfig(max_num_seqs=options.max_num_seqs,
                                              max_step_tokens=options.max_step_tokens,
                                              context_length=context_length,
                                              kv_cache_bytes=options.kv_cache_bytes,
                                              kv_cache_dtype=KV_CACHE_DTYPES[options.kv_cache_dtype],
                                              max_waiting=options.max_waiting,
                                              speculative=method,
                                              num_speculative_tokens=options.num_speculative_tokens),
                          draft_model=draft)
        # A request must fit in the KV cache on its own, so the cache bounds the context too.
        core.config.context_length = min(context_length,
                                         core.blocks.num_blocks * core.blocks.block_size)
        return core

    engine = AsyncEngine(build_core)
    context_length = engine.core.config.context_length
    backend = TextBackend(tokenizer, engine, context_length=context_length,
                          chat_template=template, vision=prompter)
    compiler_for(tokenizer).prepare_in_background()  # structured outputs' vocabulary
    model_id = options.served_model_name or _default_model_id(options.model_path)
    spec = model_spec(model_id, context_length=context_length)
    spec.vision = prompter is not None
    return spec, backend


def _has_4bit_weights(path: str) -> bool:
    """A GGUF file, or a checkpoint whose config.json says pack-quantized INT4 (K2-Thinking's
    experts): weights the int4 kernels run as they are."""
    if path.endswith(".gguf"):
        return True
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path) as f:
        return is_compressed_tensors_checkpoint(json.load(f))


def check_same_tokenizer(target, draft, draft_path: str) -> None:
    """A draft model must tokenize as the target does: its proposals are token ids."""
    sample = "def f(x):\n    return x * 2  # Ünïcode, 数字 123\n<|im_end|>"
    if target.vocab_size != draft.vocab_size or target.encode(sample) != draft.encode(sample):
        raise ValueError(f"{draft_path}: the draft model's tokenizer is not the target model's")


def _default_model_id(model_path: str | None) -> str:
    """The embedded model's id, a checkpoint's own `_name_or_path`, else the file/dir name."""
    if model_path is None:
        return EMBEDDED_CHAT_MODEL_ID
    config_path = os.path.join(model_path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            name = json.load(f).get("_name_or_path") or ""
        if "/" in name and not os.path.isabs(name):
            return name
    name = os.path.basename(os.path.normpath(model_path))
    name = name.removesuffix(".gguf")
    # A checkout named like a catalog model ("Kimi-K2-Instruct-0905") serves under its id.
    return next((known for known in CATALOG if known.split("/")[-1] == name), name)
