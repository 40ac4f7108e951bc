"""`k2serve export`: a Llama-family GGUF as a Hugging Face checkpoint directory, so engines
that only read safetensors (vLLM, SGLang, transformers) serve the same model k2serve does.

Everything is read through k2serve's own loaders: the tensors come from `GGUFCheckpoint`
(dequantized, under HF names, q/k rows already un-permuted to HF's rotate-half layout) and
the tokenizer from `Tokenizer.from_gguf` (the `tokenizers` object k2serve encodes with), so
the directory holds exactly the weights and vocabulary k2serve runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.models.llama import ROPE_FREQ_FACTORS
from k2serve.text.tokenizer import Tokenizer

EMBEDDED_ALIASES = ("embedded", "HuggingFaceTB/SmolLM2-135M-Instruct")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_source(source: str) -> str:
    """A .gguf path, or the embedded model by its id (or "embedded")."""
    if source in EMBEDDED_ALIASES:
        return embedded_smollm2_gguf_path()
    if not source.endswith(".gguf") or not os.path.isfile(source):
        raise ValueError(f"{source}: not a .gguf file (or 'embedded' for the embedded model)")
    return source


def _f32(value: float) -> float:
    """A float32 GGUF value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def hf_config(config, dtype: str) -> dict:
    """config.json of LlamaForCausalLM from k2serve's ModelConfig (read from GGUF metadata)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(config.rms_norm_eps),
        "rope_theta": _f32(config.rope_theta),
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": dtype,
    }
    if config.rope_scaling:
        out["rope_scaling"] = dict(config.rope_scaling)
    return out


def tokenizer_files(tokenizer: Tokenizer, context_length: int) -> tuple[dict, dict]:
    """tokenizer_config.json and the special-token part of generation_config.json."""
    added = {str(i): {"content": text, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": special}
             for i, (text, special) in sorted(tokenizer.added_tokens.items())}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokenizer.special_tokens_map,
        # A rendered chat prompt carries its own BOS (the template writes it); the GGUF's
        # add_bos flag is already in tokenizer.json's post-processor.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "added_tokens_decoder": added,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    # Every id k2serve stops on, so an engine serving this directory stops where k2serve does.
    stops = sorted(tokenizer.stop_token_ids)
    generation = {"bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": stops[0] if len(stops) == 1 else stops,
                  "pad_token_id": tokenizer.pad_token_id}
    return config, {k: v for k, v in generation.items() if v is not None}


def export_gguf(source: str, out_dir: str, dtype: str = "float32") -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json for the GGUF at `source` (or the embedded model) into out_dir.

    float32 keeps the dequantized weights exactly (a 4-bit block's scale times its integer
    plus its offset fits float32, not bfloat16); bfloat16 halves the size."""
    from k2serve.models.loaders.gguf import GGUFCheckpoint

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    path = resolve_source(source)
    checkpoint = GGUFCheckpoint(path)
    config = checkpoint.config
    if ROPE_FREQ_FACTORS in checkpoint.names:
        raise ValueError(f"{path}: Llama 3.1-style rope frequency factors are not exported "
                         f"(config.json would need the original rope_scaling values)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors = {name: tensor.to(DTYPES[dtype]).contiguous()
               for name, tensor in checkpoint.iter_tensors()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    tokenizer = Tokenizer.from_gguf(path)
    tokenizer.backend.save(str(out / "tokenizer.json"))
    tokenizer_config, generation = tokenizer_files(tokenizer, config.context_length)
    files = {"config.json": hf_config(config, dtype),
             "tokenizer_config.json": tokenizer_config,
             "generation_config.json": generation}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return out
