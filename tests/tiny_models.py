"""Small models and files the tests build or share."""

from __future__ import annotations

import os

import pytest
import torch

from k2serve.models.embedded import embedded_smollm2_gguf_path


def smollm2_gguf_path() -> str:
    """The embedded SmolLM2 GGUF; a test run without it is a broken install, not a skip."""
    path = embedded_smollm2_gguf_path()
    assert os.path.exists(path), path
    return path


def tiny_hf_llama(tie=False, rope_parameters=None, dtype=torch.float32):
    """A 2-layer random transformers Llama with GQA and non-trivial norms."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make the norms non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)
